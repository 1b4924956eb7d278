"""The settings (relayd.config): defaults, overrides, validation and immutability."""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from relayd import config
from relayd.errors import ConfigError

MINIMAL: dict[str, Any] = {"amqp": {"url": "amqps://relay@broker.example:5671/relayd"},
                           "store": {"url": "sqlite:///var/lib/relayd/relayd.db"},
                           "keys": {"dir": "/etc/relayd/keys"}}


def _minimal() -> dict[str, Any]:
    """A fresh copy of MINIMAL: config.parse applies overrides to the dict it is given."""
    return copy.deepcopy(MINIMAL)


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _problems(data: Any, environ: dict[str, str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        config.parse(data, environ={} if environ is None else environ)
    return caught.value.problems


def _with(section: str, **values: Any) -> dict[str, Any]:
    data = _minimal()
    data.setdefault(section, {}).update(values)
    return data


class TestDefaults:
    def test_minimal_file_loads_with_defaults(self, tmp_path: Path) -> None:
        """amqp.url, store.url and keys.dir suffice; every other key takes its default."""
        settings = config.load(_write(tmp_path, MINIMAL), environ={})
        assert settings.amqp.url == MINIMAL["amqp"]["url"]
        assert settings.keys.dir == Path("/etc/relayd/keys")
        assert settings.store.sqlite_path == Path("var/lib/relayd/relayd.db")
        assert settings.limits.max_envelope_bytes == 1_048_576
        assert settings.topology.inbound_queue == "relayd.inbound"
        assert settings.topology.ingress_exchange == "relayd.ingress"
        assert settings.topology.replies_exchange == "relayd.replies"
        assert settings.topology.dead_exchange == "relayd.dead"
        assert settings.topology.device_queue == "relayd.device.{device}"
        assert settings.topology.business_inbox == "relayd.biz.{business}.inbox"
        assert settings.workers.prefetch == 256
        assert settings.limits.replay_window == 1024
        assert settings.keys.grace_period_days == 30.0
        assert settings.amqp.management is None
        assert settings.amqp.tls.verify_hostname is True
        assert settings.conversations.opaque_id_policy == "stable"

    def test_every_default_equals_a_fresh_section(self, tmp_path: Path) -> None:
        """Sections not in the file equal their model's defaults exactly."""
        settings = config.load(_write(tmp_path, MINIMAL), environ={})
        assert settings.workers == config.Workers()
        assert settings.topology == config.Topology()
        assert settings.limits == config.Limits()
        assert settings.logging == config.Logging()
        assert settings.metrics == config.Metrics()


class TestEnvironment:
    def test_amqp_url_override(self, tmp_path: Path) -> None:
        """RELAYD_AMQP__URL replaces amqp.url from the file."""
        settings = config.load(_write(tmp_path, MINIMAL),
                               environ={"RELAYD_AMQP__URL": "amqp://other:5672/"})
        assert settings.amqp.url == "amqp://other:5672/"

    def test_prefetch_override_is_typed(self, tmp_path: Path) -> None:
        """RELAYD_WORKERS__PREFETCH=10 becomes the integer 10 in a section absent from the file."""
        settings = config.load(_write(tmp_path, MINIMAL),
                               environ={"RELAYD_WORKERS__PREFETCH": "10"})
        assert settings.workers.prefetch == 10
        assert type(settings.workers.prefetch) is int

    def test_nested_override(self, tmp_path: Path) -> None:
        """RELAYD_AMQP__TLS__CA_FILE sets amqp.tls.ca_file two levels down."""
        settings = config.load(_write(tmp_path, MINIMAL),
                               environ={"RELAYD_AMQP__TLS__CA_FILE": "/etc/ssl/ca.pem"})
        assert settings.amqp.tls.ca_file == Path("/etc/ssl/ca.pem")
        assert settings.amqp.url == MINIMAL["amqp"]["url"]

    def test_unrelated_variables_ignored(self, tmp_path: Path) -> None:
        """Variables without the prefix or without '__' change nothing."""
        settings = config.load(_write(tmp_path, MINIMAL),
                               environ={"WORKERS__PREFETCH": "3", "RELAYD_PREFETCH": "3"})
        assert settings.workers.prefetch == 256

    def test_process_environment_used_by_default(self, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        """Without environ=, os.environ applies; environ={} shuts it out."""
        monkeypatch.setenv("RELAYD_WORKERS__PREFETCH", "7")
        path = _write(tmp_path, MINIMAL)
        assert config.load(path).workers.prefetch == 7
        assert config.load(path, environ={}).workers.prefetch == 256

    def test_bad_override_named_by_dotted_key(self) -> None:
        """An override with a wrong value is reported under its dotted key."""
        problems = _problems(_minimal(), {"RELAYD_WORKERS__PREFETCH": "many"})
        assert set(problems) == {"workers.prefetch"}

    def test_override_below_a_scalar_refused(self) -> None:
        """An override that treats a scalar as a section is a ConfigError."""
        problems = _problems(_minimal(), {"RELAYD_AMQP__URL__HOST": "x"})
        assert set(problems) == {"amqp.url.host"}

    @pytest.mark.parametrize("secret", ["s3cret #1", "123456"])
    def test_string_override_taken_verbatim(self, secret: str) -> None:
        """A password given in the environment reaches the settings unchanged."""
        data = _with("amqp", management={"url": "http://broker:15672", "username": "relayd",
                                         "password": "from-file-1"})
        settings = config.parse(data, environ={"RELAYD_AMQP__MANAGEMENT__PASSWORD": secret})
        assert settings.amqp.management is not None
        assert settings.amqp.management.password == secret


class TestValidation:
    def test_every_problem_named_by_dotted_key(self, tmp_path: Path) -> None:
        """One ConfigError names each bad key: a bad value, a bad url and an unknown key."""
        data = _with("workers", inbound=0)
        data["amqp"]["url"] = "http://broker"
        data["limits"] = {"max_envelop_bytes": 10}
        data["bogus"] = {}
        with pytest.raises(ConfigError) as caught:
            config.load(_write(tmp_path, data), environ={})
        problems = caught.value.problems
        assert set(problems) == {"workers.inbound", "amqp.url", "limits.max_envelop_bytes",
                                 "bogus"}
        assert "1" in problems["workers.inbound"]
        assert "amqp://" in problems["amqp.url"]
        assert "workers.inbound" in str(caught.value)

    @pytest.mark.parametrize("missing", ["amqp", "store", "keys"])
    def test_required_sections(self, missing: str) -> None:
        """Each of the three required sections is named when absent."""
        data = {k: v for k, v in _minimal().items() if k != missing}
        assert set(_problems(data)) == {missing}

    @pytest.mark.parametrize(("section", "values", "key"), [
        ("store", {"url": "mysql://x"}, "store.url"),
        ("keys", {"grace_period_days": -1}, "keys.grace_period_days"),
        ("limits", {"replay_window": 63}, "limits.replay_window"),
        ("limits", {"max_envelope_bytes": 0}, "limits.max_envelope_bytes"),
        ("topology", {"device_queue": "relayd.device"}, "topology.device_queue"),
        ("topology", {"business_inbox": "inbox"}, "topology.business_inbox"),
        ("topology", {"queue_type": "stream"}, "topology.queue_type"),
        ("logging", {"level": "verbose"}, "logging.level"),
        ("metrics", {"port": 70000}, "metrics.port"),
        ("workers", {"shutdown_timeout": 0}, "workers.shutdown_timeout"),
    ])
    def test_bad_values_named(self, section: str, values: dict[str, Any], key: str) -> None:
        """Out-of-range or malformed values are reported under their dotted key."""
        assert set(_problems(_with(section, **values))) == {key}

    @pytest.mark.parametrize("password", ["change-me", "CHANGEME", " secret ", "password"])
    def test_placeholder_management_password_refused(self, password: str) -> None:
        """A placeholder management password is refused under amqp.management.password."""
        data = _with("amqp", management={"url": "http://broker:15672", "username": "relayd",
                                         "password": password})
        problems = _problems(data)
        assert set(problems) == {"amqp.management.password"}
        assert "placeholder" in problems["amqp.management.password"]

    def test_replay_state_must_outlive_the_max_age(self) -> None:
        """Replay state kept for less than limits.max_age_seconds is refused by its key."""
        data = _with("retention", replay_state_days=1)
        data["limits"] = {"max_age_seconds": 86400 + 1}
        assert set(_problems(data)) == {"retention.replay_state_days"}
        data["limits"] = {"max_age_seconds": 86400}
        assert config.parse(data, environ={}).retention.replay_state_days == 1

    def test_edge_processes_need_a_name_and_one_shared_port(self) -> None:
        """workers.edge > 0 needs edge.name; more than one edge process needs a port they
        can share (0 would give each another one); one may take any free port."""
        data = _with("workers", edge=2)
        assert set(_problems(data)) == {"edge.name"}
        data["edge"] = {"name": "edge.example", "port": 0}
        assert set(_problems(data)) == {"edge.port"}
        data["workers"]["edge"] = 1
        assert config.parse(data, environ={}).edge.port == 0
        data["workers"]["edge"], data["edge"]["port"] = 2, 8443
        assert config.parse(data, environ={}).workers.edge == 2

    def test_real_management_password_accepted(self) -> None:
        """A non-placeholder management password is kept."""
        data = _with("amqp", management={"url": "http://broker:15672", "username": "relayd",
                                         "password": "k7#Qv9!long"})
        settings = config.parse(data, environ={})
        assert settings.amqp.management is not None
        assert settings.amqp.management.password == "k7#Qv9!long"

    @pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
    def test_top_level_must_be_mapping(self, tmp_path: Path, text: str) -> None:
        """A YAML file that is not a mapping is refused at the top level."""
        path = tmp_path / "relayd.yaml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as caught:
            config.load(path, environ={})
        assert set(caught.value.problems) == {"(top level)"}

    def test_empty_file_reports_required_sections(self, tmp_path: Path) -> None:
        """An empty file is read as no settings: the three required sections are named."""
        path = tmp_path / "relayd.yaml"
        path.write_text("", encoding="utf-8")
        with pytest.raises(ConfigError) as caught:
            config.load(path, environ={})
        assert set(caught.value.problems) == {"amqp", "store", "keys"}

    def test_invalid_yaml_and_missing_file(self, tmp_path: Path) -> None:
        """Unreadable or non-YAML files are ConfigErrors about the file."""
        path = tmp_path / "relayd.yaml"
        path.write_text("amqp: [unclosed\n", encoding="utf-8")
        for target in (path, tmp_path / "absent.yaml"):
            with pytest.raises(ConfigError) as caught:
                config.load(target, environ={})
            assert set(caught.value.problems) == {"(file)"}

    @pytest.mark.parametrize("text", [
        'amqp:\n  url: "amqp://relayd:SECRET@broker/relayd\n',  # a quote left open
        "amqp:\n  management: {password: SECRET: x}\n",  # a flow mapping broken
        "amqp:\n  url: amqp://relayd:SECRET@broker\n\tstore: x\n",  # a tab
        "amqp:\n  url: [amqp://relayd:SECRET@broker\nstore: {}\n",  # a list left open
        "amqp: {url: x}\n  password: SECRET\n",  # bad indentation
    ], ids=["quote", "flow", "tab", "list", "indent"])
    def test_invalid_yaml_names_the_place_not_the_text(self, tmp_path: Path,
                                                       text: str) -> None:
        """The error says at which line and column the YAML broke, and never quotes the
        file: the broken line may hold a password, and the error goes to the journal."""
        path = tmp_path / "relayd.yaml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as caught:
            config.load(path, environ={})
        assert "SECRET" not in str(caught.value)
        assert "line " in caught.value.problems["(file)"]

    def test_file_left_unchanged(self, tmp_path: Path) -> None:
        """Loading with overrides never rewrites the operator's file."""
        path = _write(tmp_path, MINIMAL)
        before = path.read_bytes()
        config.load(path, environ={"RELAYD_WORKERS__PREFETCH": "10"})
        assert path.read_bytes() == before


    def test_parse_leaves_its_argument_unchanged(self) -> None:
        """parse() with overrides does not modify the mapping it was given."""
        data = _minimal()
        config.parse(data, environ={"RELAYD_WORKERS__PREFETCH": "10"})
        assert data == MINIMAL


class TestFrozen:
    def test_settings_cannot_be_assigned(self) -> None:
        """Assigning to the settings or to a section raises."""
        settings = config.parse(_minimal(), environ={})
        with pytest.raises(ValidationError):
            settings.workers = config.Workers(prefetch=1)  # type: ignore[misc]
        with pytest.raises(ValidationError):
            settings.workers.prefetch = 1  # type: ignore[misc]
        assert settings.workers.prefetch == 256


class TestKeyVault:
    def test_amqp_names_the_vault_service(self) -> None:
        """store.key_vault: amqp is accepted, with the vault section's defaults."""
        settings = config.parse(_with("store", key_vault="amqp"), environ={})
        assert settings.store.key_vault == "amqp"
        assert settings.vault.file == Path("/var/lib/relayd/keys.db")
        assert settings.topology.vault_queue == "relayd.vault"

    def test_anything_else_is_refused_by_its_dotted_key(self) -> None:
        """A key_vault that is neither sqlite:/// nor amqp, and a relative vault.file, are
        refused naming the key."""
        assert "must be sqlite:///PATH or amqp" in _problems(
            _with("store", key_vault="redis://vault"))["store.key_vault"]
        assert "absolute" in _problems(_with("vault", file="keys.db"))["vault.file"]

    def test_the_vault_logs_in_as_its_own_user(self) -> None:
        """vault.url (default amqp.url) is the login of the vault's traffic, over
        amqp.tls; vault.user defaults to the user name in that URL."""
        alone = config.parse(_with("store", key_vault="amqp"), environ={})
        assert config.vault_user(alone) == "relay"
        assert config.vault_login(alone).amqp == alone.amqp
        data = _with("vault", url="amqps://keys:pw@broker.example:5671/relayd")
        data["store"]["key_vault"] = "amqp"
        own = config.parse(data, environ={})
        assert config.vault_user(own) == "keys"
        login = config.vault_login(own)
        assert login.amqp.url == "amqps://keys:pw@broker.example:5671/relayd"
        assert (login.amqp.tls, login.amqp.heartbeat) == (own.amqp.tls, own.amqp.heartbeat)

    def test_the_vault_may_log_in_with_a_certificate_of_its_own(self) -> None:
        """vault.tls, where set, is the TLS of the vault's traffic in place of amqp.tls
        (whose certificate is relayd's); the rest of amqp stays."""
        data = _with("vault", url="amqps://broker.example:5671/relayd?auth=external",
                     user="relayd-vault", tls={"ca_file": "/etc/relayd/ca.pem",
                                               "cert_file": "/etc/relayd/vault.pem",
                                               "key_file": "/etc/relayd/vault.key"})
        data["amqp"]["tls"] = {"cert_file": "/etc/relayd/relayd.pem"}
        settings = config.parse(data, environ={})
        login = config.vault_login(settings)
        assert login.amqp.tls.cert_file == Path("/etc/relayd/vault.pem")
        assert login.amqp.tls.ca_file == Path("/etc/relayd/ca.pem")
        assert settings.amqp.tls.cert_file == Path("/etc/relayd/relayd.pem")
        assert config.vault_user(settings) == "relayd-vault"

    def test_relayd_publishes_as_the_user_it_logs_in_as(self, tmp_path: Path) -> None:
        """relay_user: the user name in amqp.url, else the CN of amqp.tls.cert_file (the
        broker's user name for a certificate login), else None."""
        assert config.relay_user(config.parse(_minimal(), environ={})) == "relay"
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "relayd-host-1")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(1).not_valid_before(now)
                .not_valid_after(now + datetime.timedelta(days=1))
                .sign(key, hashes.SHA256()))
        pem = tmp_path / "client.pem"
        pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        data = _with("amqp", url="amqps://broker.example/relayd?auth=external",
                     tls={"cert_file": str(pem)})
        assert config.relay_user(config.parse(data, environ={})) == "relayd-host-1"
        data["amqp"]["tls"] = {}
        assert config.relay_user(config.parse(data, environ={})) is None
        pem.write_bytes(b"not a certificate")
        data["amqp"]["tls"] = {"cert_file": str(pem)}
        assert config.relay_user(config.parse(data, environ={})) is None

    def test_a_vault_user_that_cannot_be_is_refused(self) -> None:
        """A certificate login without vault.user, a vault.user other than the URL's, and a
        vault.url that is not AMQP are refused by their dotted keys."""
        cert = _with("vault", url="amqps://broker.example:5671/relayd?auth=external")
        cert["store"]["key_vault"] = "amqp"
        assert "names no user" in _problems(cert)["vault.user"]
        cert["vault"]["user"] = "keys"
        assert config.vault_user(config.parse(cert, environ={})) == "keys"
        assert "vault.url" in _problems(_with("vault", url="amqps://a:pw@b/relayd",
                                              user="keys"))["vault.user"]
        assert "amqp.url" in _problems(_with("vault", user="keys"))["vault.user"]
        assert "amqp" in _problems(_with("vault", url="https://b/"))["vault.url"]
