"""The settings: one typed, frozen object built from YAML plus `RELAYD_*` overrides.

Only `amqp.url`, `store.url` and `keys.dir` are required; every other key has a default.
`config/relayd.example.yaml` documents each key.
"""

from __future__ import annotations

import copy
import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from relayd.errors import ConfigError

ENV_PREFIX = "RELAYD_"
PLACEHOLDERS = {"change-me", "changeme", "change_me", "secret", "password", "xxx"}

Positive = Annotated[int, Field(ge=1)]
Seconds = Annotated[float, Field(gt=0)]
Rate = Annotated[float, Field(gt=0)]  # per second
Days = Annotated[float, Field(gt=0)]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TLS(Section):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    verify_hostname: bool = True
    server_hostname: str | None = None


class Management(Section):
    url: str
    username: str
    password: str
    vhost: str | None = None  # None: the vhost of amqp.url
    auth: Literal["password", "x509"] = "password"
    ca_file: Path | None = None
    timeout: Seconds = 10.0
    max_connections: Positive = 10
    max_channels: Positive = 20

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("password")
    @classmethod
    def _not_placeholder(cls, value: str) -> str:
        if value.strip().lower() in PLACEHOLDERS:
            raise ValueError("is a placeholder: set a real secret")
        return value


class Amqp(Section):
    url: str
    heartbeat: Annotated[int, Field(ge=0)] = 5
    connect_timeout: Seconds = 10.0
    reconnect_max_backoff: Seconds = 30.0
    tls: TLS = TLS()
    management: Management | None = None
    channel_max: Annotated[int, Field(ge=0, le=65535)] = 128  # as deploy/rabbitmq sets it

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("amqp://", "amqps://")):
            raise ValueError("must start with amqp:// or amqps://")
        return value


class Store(Section):
    url: str
    pool_size: Positive = 10
    # None: the per-user keys live in the store itself; sqlite:///PATH: in that file;
    # amqp: in the vault service (`relayd vault`), asked over the broker (relayd.vault)
    key_vault: str | None = None

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must be sqlite:///PATH or postgresql://…")
        return value

    @field_validator("key_vault")
    @classmethod
    def _vault(cls, value: str | None) -> str | None:
        if value is not None and value != "amqp" and not value.startswith("sqlite:///"):
            raise ValueError("must be sqlite:///PATH or amqp")
        return value

    @property
    def sqlite_path(self) -> Path:
        """The database file of a `sqlite:///PATH` url."""
        return Path(self.url.removeprefix("sqlite:///"))


class Keys(Section):
    dir: Path
    grace_period_days: Annotated[float, Field(ge=0)] = 30.0


class Workers(Section):
    inbound: Positive = 1
    outbound: Positive = 1
    edge: Annotated[int, Field(ge=0)] = 0
    prefetch: Positive = 256
    shutdown_timeout: Seconds = 10.0
    retry_initial_backoff: Seconds = 0.5
    retry_max_backoff: Seconds = 30.0
    max_attempts: Positive = 5


class Topology(Section):
    queue_type: Literal["quorum", "classic"] = "quorum"
    ingress_exchange: str = "relayd.ingress"
    inbound_routing_key: str = "inbound"
    inbound_queue: str = "relayd.inbound"
    replies_exchange: str = "relayd.replies"
    outbound_queue: str = "relayd.outbound"
    devices_exchange: str = "relayd.devices"
    device_queue: str = "relayd.device.{device}"
    business_exchange: str = "relayd.biz.{business}"
    business_inbox: str = "relayd.biz.{business}.inbox"
    dead_exchange: str = "relayd.dead"
    dead_queue: str = "relayd.dead"
    queue_max_length: Positive = 1_000_000
    business_inbox_max_length: Positive = 100_000
    device_queue_max_length: Positive = 10_000
    device_message_ttl_days: Annotated[float, Field(gt=0)] = 30.0
    dead_message_ttl_days: Annotated[float, Field(gt=0)] = 14.0
    dead_queue_max_length: Positive = 100_000
    dead_queue_max_bytes: Positive = 256 * 1024 * 1024
    delivery_limit: Positive = 10
    gdpr_exchange: str = "relayd.gdpr"
    gdpr_queue: str = "relayd.gdpr"
    vault_queue: str = "relayd.vault"
    shards: Annotated[int, Field(ge=1, le=1024)] = 1
    shard_exchange: str = "relayd.shards"
    shard_member_ttl: Annotated[float, Field(ge=0.3, le=600)] = 6.0
    edge_exchange: str = "relayd.edge"
    wake_exchange: str = "relayd.wake"
    wake_queue: str = "relayd.wake"
    wake_queue_max_length: Positive = 100_000
    receipts_routing_key: str = "receipt"
    receipts_queue: str = "relayd.receipts"
    expired_exchange: str = "relayd.expired"

    @field_validator("device_queue")
    @classmethod
    def _has_device(cls, value: str) -> str:
        if "{device}" not in value:
            raise ValueError("must contain {device}")
        return value

    @field_validator("business_exchange", "business_inbox")
    @classmethod
    def _has_business(cls, value: str) -> str:
        if "{business}" not in value:
            raise ValueError("must contain {business}")
        return value


class Limits(Section):
    max_envelope_bytes: Positive = 1024 * 1024
    max_text_chars: Positive = 10_000
    max_inline_attachment_bytes: Positive = 256 * 1024
    max_attachments: Positive = 10
    max_quick_replies: Annotated[int, Field(ge=2)] = 5
    max_list_items: Positive = 100
    max_time_slots: Positive = 50
    max_thumbnail_bytes: Positive = 16 * 1024
    replay_window: Annotated[int, Field(ge=64, le=65536)] = 1024
    clock_skew_seconds: Annotated[float, Field(ge=0)] = 300.0
    max_age_seconds: Seconds = 7 * 24 * 3600.0
    business_rate: Rate = 50.0
    business_burst: Positive = 200
    device_rate: Rate = 3.0
    device_burst: Positive = 60


class Edge(Section):
    """`relayd edge`: the WebSocket door of device apps (docs/protocol.md section 12)."""

    name: str | None = None  # required to run the edge: devices sign it at login
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8443
    cert_file: Path | None = None  # with key_file: relayd speaks TLS (wss://) itself
    key_file: Path | None = None
    max_connections: Positive = 10_000
    max_frame_bytes: Positive = 1536 * 1024
    max_unacked: Annotated[int, Field(ge=1, le=65535)] = 64
    max_inflight: Positive = 64
    ping_interval: Seconds = 20.0
    ping_timeout: Seconds = 20.0
    login_timeout: Seconds = 10.0
    send_timeout: Seconds = 10.0
    takeover_timeout: Seconds = 5.0
    connection_rate: Rate = 10.0
    connection_burst: Positive = 60
    channels: Annotated[int, Field(ge=1, le=64)] = 8

    @field_validator("name")
    @classmethod
    def _edge_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}", value):
            raise ValueError("1-128 letters, digits, '_', '.', ':' or '-', first a letter or"
                             " digit")
        return value


class Conversations(Section):
    opaque_id_policy: Literal["stable", "rotate_on_delete"] = "stable"


class Retention(Section):
    """How long the relay keeps what it must keep; a job in `relayd run` enforces it."""

    enabled: bool = True
    interval_seconds: Seconds = 3600.0
    inactive_conversation_days: Days = 180.0
    closed_conversation_days: Days = 30.0
    replay_state_days: Days = 30.0
    sent_days: Days = 7.0
    audit_days: Days = 365.0


class Wake(Section):
    """Push wake for devices with messages waiting and no edge connection (relayd.wake)."""

    enabled: bool = False
    interval: Seconds = 60.0


class Gdpr(Section):
    identity_user: str | None = None  # the AMQP user whose requests (relayd.identity) are trusted


class Logging(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Metrics(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9464


class Vault(Section):
    """The key vault service (`relayd vault`) and how relay hosts ask it."""

    file: Path = Path("/var/lib/relayd/keys.db")  # the service's SQLite file
    timeout: Seconds = 5.0  # how long a host waits for an answer
    # The broker login of the vault's traffic, on the service and on every asker: None is
    # amqp.url (one host); a user of its own keeps the edge, which logs in as relayd, out
    url: str | None = None
    # How vault.url's TLS is checked and which client certificate it presents (with
    # ?auth=external, the certificate's CN is vault.user); None: amqp.tls, whose
    # certificate is relayd's own, so a vault user of its own logs in by password there
    tls: TLS | None = None
    # The broker user whose requests the service answers (the broker-validated user_id),
    # which askers set; None: the user name in vault.url (or amqp.url)
    user: str | None = None

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("amqp://", "amqps://")):
            raise ValueError("must start with amqp:// or amqps://")
        return value

    @field_validator("file")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value


class Settings(Section):
    amqp: Amqp
    store: Store
    keys: Keys
    workers: Workers = Workers()
    topology: Topology = Topology()
    limits: Limits = Limits()
    conversations: Conversations = Conversations()
    retention: Retention = Retention()
    edge: Edge = Edge()
    gdpr: Gdpr = Gdpr()
    vault: Vault = Vault()
    wake: Wake = Wake()
    logging: Logging = Logging()
    metrics: Metrics = Metrics()


CHANNELS_BESIDE_SHARDS = 3  # the worker's own, the router's, and a spare for probes
WAKE_CHANNELS = 2  # with wake.enabled: the decider's consumer, and its probes (relayd.wake)


def channels_needed(t: Topology, wake: bool = False) -> int:
    """The most channels a worker opens on its connection: one per shard it holds (all of
    them, when it is the last process of its role), and CHANNELS_BESIDE_SHARDS."""
    return ((t.shards if t.shards > 1 else 0) + CHANNELS_BESIDE_SHARDS
            + (WAKE_CHANNELS - 1 if wake else 0))  # the spare is one of them


def _with_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Apply `RELAYD_SECTION__KEY=value` overrides, each value taken as given."""
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = name.removeprefix(ENV_PREFIX).lower().split("__")
        node = data
        for part in path[:-1]:
            child = node.get(part)
            node = node.setdefault(part, {}) if child is None else child
            if not isinstance(node, dict):
                raise ConfigError({".".join(path): f"{name} overrides a non-section"})
        node[path[-1]] = raw  # validation converts it: "10" to 10, "true" to True
    return data


def vault_login(settings: Settings) -> Settings:
    """`settings` with amqp.url and amqp.tls those of the vault's traffic (vault.url,
    vault.tls), for the service and its askers to connect with."""
    return settings.model_copy(update={"amqp": settings.amqp.model_copy(update={
        "url": settings.vault.url or settings.amqp.url,
        "tls": settings.vault.tls or settings.amqp.tls})})


def relay_user(settings: Settings) -> str | None:
    """The broker user relayd, and the edge, which logs in as relayd, publish as: the user
    name in amqp.url, else the CN of amqp.tls.cert_file (a certificate login, where the
    broker takes the CN as the user name: deploy/rabbitmq's ssl_cert_login_from); None
    when neither names one."""
    named = urllib.parse.unquote(urllib.parse.urlsplit(settings.amqp.url).username or "")
    if named or settings.amqp.tls.cert_file is None:
        return named or None
    try:
        cert = x509.load_pem_x509_certificate(settings.amqp.tls.cert_file.read_bytes())
    except (OSError, ValueError):
        return None
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def vault_user(settings: Settings) -> str:
    """The broker user the vault answers and its askers publish as: vault.user, else the
    user name its URL logs in with. ConfigError when neither names one (a certificate
    login), or when they differ (the broker would refuse every request)."""
    url = settings.vault.url or settings.amqp.url
    key = "vault.url" if settings.vault.url else "amqp.url"
    named = urllib.parse.unquote(urllib.parse.urlsplit(url).username or "")
    user = settings.vault.user or named
    if not user:
        raise ConfigError({"vault.user": f"must be set: {key} names no user (with a"
                           " certificate login, the certificate's CN)"})
    if named and named != user:
        raise ConfigError({"vault.user": f"must be the user {key} logs in as"})
    return user


def require_edge(settings: Settings) -> None:
    """What running the edge needs beyond a valid config: its name, which devices sign."""
    if settings.edge.name is None:
        raise ConfigError({"edge.name": "must be set to run the edge (relayd edge, "
                           "workers.edge > 0 or relayd run --role edge)"})


def parse(data: Any, environ: Mapping[str, str] | None = None) -> Settings:
    """Validate a config mapping; every problem is reported under its dotted key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError({"(top level)": "must be a mapping of sections"})
    data = _with_env(copy.deepcopy(data), os.environ if environ is None else environ)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems = {}
        for err in exc.errors():
            key = ".".join(str(part) for part in err["loc"]) or "(top level)"
            problems[key] = err["msg"].removeprefix("Value error, ")
        raise ConfigError(problems) from None
    edge = settings.edge
    if (edge.cert_file is None) != (edge.key_file is None):
        raise ConfigError({"edge.key_file": "edge.cert_file and edge.key_file go together"})
    if edge.max_frame_bytes < 4 * -(-settings.limits.max_envelope_bytes // 3) + 256:
        raise ConfigError({"edge.max_frame_bytes": "must hold limits.max_envelope_bytes in"
                           " base64url, plus 256"})
    if settings.workers.edge:
        require_edge(settings)
    if settings.workers.edge > 1 and edge.port == 0:
        raise ConfigError({"edge.port": "0 (any free port) gives each edge process another "
                           "port: with workers.edge > 1, name one port they share"})
    needed = channels_needed(settings.topology, settings.wake.enabled)
    if settings.amqp.channel_max and needed > settings.amqp.channel_max:
        raise ConfigError({"topology.shards": (
            f"{settings.topology.shards} shards need {needed} channels on one connection (a"
            " process may hold every shard when the others are gone), more than"
            f" amqp.channel_max ({settings.amqp.channel_max}): lower topology.shards, or"
            " raise channel_max on the broker and amqp.channel_max with it")})
    if settings.store.key_vault == "amqp" or settings.vault.url or settings.vault.user:
        vault_user(settings)
    if settings.retention.replay_state_days * 86400 < settings.limits.max_age_seconds:
        # Until a message is too old to accept, a re-added device id must not be replayable.
        raise ConfigError({"retention.replay_state_days":
                           "must cover limits.max_age_seconds"})
    return settings


def load(path: Path | str, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, override and validate the YAML file at `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError({"(file)": f"cannot read {path}: {exc.strerror}"}) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError({"(file)": f"{path} is not valid YAML{_where(exc)}"}) from None
    return parse(data, environ)


def _where(exc: yaml.YAMLError) -> str:
    """Where the YAML went wrong and what PyYAML expected, never the text of the lines
    around it: PyYAML quotes them, and the line at fault may hold a password."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return ""
    problem = getattr(exc, "problem", None) or "a syntax error"
    return f": {problem}, at line {mark.line + 1}, column {mark.column + 1}"
