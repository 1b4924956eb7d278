"""The command line (relayd.cli.main), called in-process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import structlog
import yaml

from relayd import cli, keys, log
from relayd.client import DeviceKeys
from relayd.crypto import b64d, b64e
from relayd.errors import ExitCode


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No RELAYD_* variable from the real environment; logging reset after main()."""
    for name in list(os.environ):
        if name.startswith("RELAYD_"):
            monkeypatch.delenv(name)
    yield
    structlog.reset_defaults()
    log.reset()


def _config(tmp_path: Path, **extra: object) -> Path:
    data = {"amqp": {"url": "amqp://localhost:5672/"},
            "store": {"url": f"sqlite:///{tmp_path / 'relayd.db'}"},
            "keys": {"dir": str(tmp_path / "keys")}, "logging": {"format": "json"}, **extra}
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


class TestCheckConfig:
    def test_good_file_exits_zero(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                  ) -> None:
        """check-config on a valid file exits 0 and says ok."""
        path = _config(tmp_path)
        assert cli.main(["check-config", "--config", str(path)]) == ExitCode.OK
        assert "ok" in capsys.readouterr().out

    def test_broken_file_exits_config_and_names_every_key(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """check-config on a broken file exits 78 and prints every dotted key on stderr."""
        path = _config(tmp_path, workers={"inbound": 0}, limits={"replay_window": 1},
                       unknown_section={"x": 1})
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        data["amqp"]["url"] = "http://localhost"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        assert cli.main(["check-config", "--config", str(path)]) == ExitCode.CONFIG == 78
        err = capsys.readouterr().err
        for key in ("workers.inbound", "amqp.url", "limits.replay_window", "unknown_section"):
            assert f"{key}:" in err

    @pytest.mark.parametrize(("shards", "channel_max", "fits"), [
        (16, 16, False), (13, 16, True), (125, None, True), (126, None, False), (1000, 0, True)])
    def test_shards_that_cannot_fit_the_broker_are_refused(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str], shards: int,
            channel_max: int | None, fits: bool) -> None:
        """A process may end up holding every shard, one channel each, plus three: a
        topology.shards the broker's channel_max (amqp.channel_max, 128 by default, as
        deploy/rabbitmq sets it; 0 = no limit) cannot hold is refused with exit 78."""
        amqp: dict[str, object] = {"url": "amqp://localhost:5672/"}
        if channel_max is not None:
            amqp["channel_max"] = channel_max
        path = _config(tmp_path, amqp=amqp, topology={"shards": shards})
        code = cli.main(["check-config", "--config", str(path)])
        assert code == (ExitCode.OK if fits else ExitCode.CONFIG)
        assert ("topology.shards:" in capsys.readouterr().err) is not fits

    def test_missing_file_exits_config(self, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
        """A config path that does not exist exits 78."""
        assert cli.main(["check-config", "--config", str(tmp_path / "no.yaml")]) == (
            ExitCode.CONFIG)
        assert "cannot read" in capsys.readouterr().err


class TestKeysCommands:
    def test_generate_then_show(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                ) -> None:
        """keys generate --kid a then keys show prints one JSON object with the four keys."""
        path = _config(tmp_path)
        assert cli.main(["keys", "generate", "--config", str(path), "--kid", "a"]) == 0
        assert "hpke-a.json" in capsys.readouterr().out
        assert cli.main(["keys", "show", "--config", str(path)]) == 0
        out = capsys.readouterr().out
        info = orjson.loads(out)
        assert set(info) == {"kid", "kem", "enc_public_key", "sign_public_key"}
        assert (info["kid"], info["kem"]) == ("a", "X25519")
        assert len(b64d(info["enc_public_key"])) == 32
        assert out.count("\n") == 1

    def test_generate_twice_writes_nothing(self, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
        """A second keys generate with the same kid reports nothing written."""
        path = _config(tmp_path)
        assert cli.main(["keys", "generate", "--config", str(path), "--kid", "a"]) == 0
        capsys.readouterr()
        assert cli.main(["keys", "generate", "--config", str(path), "--kid", "a"]) == 0
        assert "nothing written" in capsys.readouterr().out

    def test_show_without_keys_exits_config(self, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
        """keys show before keys generate exits 78 with a hint."""
        path = _config(tmp_path)
        assert cli.main(["keys", "show", "--config", str(path)]) == ExitCode.CONFIG
        assert "keys generate" in capsys.readouterr().err

    def test_uncreatable_keys_dir_is_not_a_broker_failure(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """keys generate into a path under a regular file fails without blaming the broker."""
        blocker = tmp_path / "file"
        blocker.write_text("", encoding="utf-8")
        path = _config(tmp_path)
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        data["keys"]["dir"] = str(blocker / "keys")
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        code = cli.main(["keys", "generate", "--config", str(path), "--kid", "a"])
        assert code != ExitCode.UNAVAILABLE
        assert "broker" not in capsys.readouterr().err


    @pytest.mark.parametrize("kid", ["", "-a", "a b", "é", "a" * 65, "a/b"], ids=repr)
    def test_invalid_kid_exits_usage_and_writes_nothing(
        self, tmp_path: Path, kid: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """keys generate --kid with an empty or invalid kid exits 2, says what a kid is, and
        writes no file."""
        path = _config(tmp_path)
        with pytest.raises(SystemExit) as exited:
            cli.main(["keys", "generate", "--config", str(path), f"--kid={kid}"])
        assert exited.value.code == ExitCode.USAGE
        assert "a kid must match" in capsys.readouterr().err
        assert not (tmp_path / "keys").exists()


class TestUserIds:
    @pytest.mark.parametrize("command", [["device", "add", "--device", "d1", "--enc-key=a",
                                          "--sign-key=a"], ["device", "list"],
                                         ["gdpr", "erase"], ["gdpr", "export"]],
                             ids=["device-add", "device-list", "gdpr-erase", "gdpr-export"])
    @pytest.mark.parametrize("user", ["", "a\udcffb", "x" * 1025],
                             ids=["empty", "not-utf8", "too-long"])
    def test_a_user_no_store_can_hold_exits_usage(
        self, tmp_path: Path, command: list[str], user: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """--user that is empty, too long or not UTF-8 (argv bytes that were not: Python
        keeps them as lone surrogates, which no store can encode) exits 2 and says what a
        user id is, before any store is opened."""
        path = _config(tmp_path)
        with pytest.raises(SystemExit) as exited:
            cli.main([*command, "--config", str(path), f"--user={user}"])
        assert exited.value.code == ExitCode.USAGE
        assert "a user id is" in capsys.readouterr().err


class TestDeviceKeys:
    @pytest.mark.parametrize(("option", "raw", "why"), [
        ("--enc-key", bytes(32), "low-order"),
        ("--enc-key", (2**255 - 20).to_bytes(32, "little"), "low-order"),  # p - 1
        ("--enc-key", b"\xff" * 32, "not canonical"),
        ("--sign-key", bytes(32), "small order"),
        ("--sign-key", (1).to_bytes(32, "little"), "small order"),  # the identity
        ("--sign-key", b"\xff" * 31 + b"\x7f", "not canonical"),
    ], ids=["x-zero", "x-p-1", "x-noncanonical", "ed-zero", "ed-identity", "ed-noncanonical"])
    def test_weak_key_exits_usage_and_registers_nothing(
        self, tmp_path: Path, option: str, raw: bytes, why: str,
        capsys: pytest.CaptureFixture[str]
    ) -> None:
        """device add refuses a weak key before it touches the broker or the store: exit 2,
        the option and the reason on stderr, no device registered."""
        path = _config(tmp_path)
        assert cli.main(["keys", "generate", "--config", str(path)]) == ExitCode.OK
        capsys.readouterr()
        keys = DeviceKeys.generate("phone").registration("u")
        keys[option.removeprefix("--").replace("-", "_")] = b64e(raw)
        code = cli.main(["device", "add", "--config", str(path), "--user", "u",
                         "--device", "phone", f"--enc-key={keys['enc_key']}",
                         f"--sign-key={keys['sign_key']}"])
        assert code == ExitCode.USAGE
        err = capsys.readouterr().err
        assert option in err
        assert why in err
        assert cli.main(["device", "list", "--config", str(path), "--json"]) == ExitCode.OK
        assert orjson.loads(capsys.readouterr().out) == []


class TestBusinessCredentials:
    def test_password_options_need_management(self, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
        """--auth and --password-file are usage errors when no management API is set."""
        path = _config(tmp_path)
        code = cli.main(["business", "add", "acme", "--amqp-user", "acme", "--auth", "x509",
                         "--config", str(path)])
        assert code == ExitCode.USAGE
        assert "amqp.management" in capsys.readouterr().err

    def test_rotate_needs_management(self, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
        """rotate-credentials without amqp.management is a config error naming the key."""
        path = _config(tmp_path)
        keys.generate(tmp_path / "keys")  # the store is opened under the relay's secret
        assert cli.main(["business", "rotate-credentials", "acme", "--config", str(path)]
                        ) == ExitCode.CONFIG
        assert "amqp.management:" in capsys.readouterr().err

    def test_unreachable_management_registers_nothing(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """When the management API cannot be reached, add exits 69 and registers nothing."""
        management = {"url": "http://127.0.0.1:9", "username": "admin", "password": "s3cr3t"}
        path = _config(tmp_path, amqp={"url": "amqp://127.0.0.1:9/", "management": management})
        keys.generate(tmp_path / "keys")
        assert cli.main(["business", "add", "acme", "--amqp-user", "acme",
                         "--config", str(path)]) == ExitCode.UNAVAILABLE
        capsys.readouterr()
        assert cli.main(["business", "list", "--json", "--config", str(path)]) == ExitCode.OK
        assert orjson.loads(capsys.readouterr().out) == []


class TestErrorsNameTheCause:
    def test_closed_stdout_is_not_the_broker(self, tmp_path: Path) -> None:
        """When stdout's reader has gone (`relayd keys show | head -0`), the command exits
        141, as a shell reports SIGPIPE, and says so, without blaming the broker."""
        path = _config(tmp_path)
        assert cli.main(["keys", "generate", "--config", str(path)]) == ExitCode.OK
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            result = subprocess.run(
                [sys.executable, "-m", "relayd", "keys", "show", "--config", str(path)],
                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False)
        finally:
            os.close(write_end)
        assert result.returncode == ExitCode.BROKEN_PIPE == 141
        assert "stdout" in result.stderr
        assert "broker" not in result.stderr
        assert "Traceback" not in result.stderr

    def test_unreadable_keys_dir_is_not_missing_keys(self, tmp_path: Path) -> None:
        """A keys directory this user may not read (root's, read by the service user)
        exits 78 naming the user, and does not say to generate keys."""
        path = _config(tmp_path)
        assert cli.main(["keys", "generate", "--config", str(path)]) == ExitCode.OK
        keys_dir = tmp_path / "keys"
        command = [sys.executable, "-m", "relayd", "keys", "show", "--config", str(path)]
        if os.geteuid() == 0:  # another user's directory, and root without its overrides
            shutil.chown(keys_dir, "nobody")
            command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--",
                       *command]
        else:  # our own directory, without the right to read it
            keys_dir.chmod(0o300)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                    check=False)
        finally:
            keys_dir.chmod(0o700)
        assert result.returncode == ExitCode.CONFIG, result.stderr
        assert "not readable by user" in result.stderr
        assert "keys generate" not in result.stderr
