"""The Debian package: scripts/build-deb builds it (lintian-clean, or the build fails);
dpkg installs it; the installed relayd runs as its own user from /opt/relayd; dpkg
installs it again over itself, and purges it, keeping the keys and the store.

It changes the machine (a package, the relayd user, /etc/relayd, /var/lib/relayd), so
it runs only as root with dpkg, where no relayd is installed or left over, and puts the
machine back as it found it: purge, then remove what purge keeps and the user if it
made it. RELAYD_TEST_DEB=path/to.deb tests that package instead of building one.
"""

from __future__ import annotations

import asyncio
import contextlib
import filecmp
import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
VENV = Path("/opt/relayd")
RELAYD = VENV / "bin" / "relayd"
PLACES = (VENV, Path("/etc/relayd"), Path("/var/lib/relayd"))

pytestmark = pytest.mark.package


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "installs a package: needs root"
    for tool in ("dpkg", "dpkg-query", "rabbitmqctl"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    known = subprocess.run(["dpkg-query", "-W", "relayd"], capture_output=True, check=False)
    if known.returncode == 0:
        return "a relayd package is installed (or left configured) here already"
    if any(place.exists() for place in PLACES):
        return "a relayd is installed here by hand: not touching it"
    return None


def sh(*args: str, check: bool = True, timeout: float = 300,
       cwd: Path | str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=timeout,
                          cwd=cwd)


def as_relayd(credentials: Path) -> dict[str, Any]:
    """Popen arguments that run a command as the relayd user (and only its group), with
    the keys as systemd credentials, as the unit does."""
    return {"user": "relayd", "group": "relayd", "extra_groups": [], "cwd": "/",
            "env": {"PATH": "/usr/bin:/bin", "CREDENTIALS_DIRECTORY": str(credentials)}}


@pytest.fixture(scope="module")
def deb() -> Path:
    """The package: built by scripts/build-deb, which fails on a lintian error or warning."""
    why = _why_not()
    if why:
        pytest.skip(why)
    given = os.environ.get("RELAYD_TEST_DEB")
    if given:
        return Path(given)
    result = sh(str(ROOT / "scripts" / "build-deb"), check=False, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    path = ROOT / result.stdout.strip().splitlines()[-1]
    assert path.name.startswith(f"relayd_{VERSION}-")
    return path


@pytest.fixture(scope="module")
def installed(deb: Path) -> Iterator[Path]:
    """The package installed with dpkg; afterwards the machine as it was."""
    had_user = _exists(pwd.getpwnam, "relayd")
    had_group = _exists(grp.getgrnam, "relayd")
    try:
        sh("dpkg", "-i", str(deb))
        yield deb
    finally:
        sh("dpkg", "--purge", "relayd", check=False)
        for place in PLACES:
            shutil.rmtree(place, ignore_errors=True)
        if not had_user and _exists(pwd.getpwnam, "relayd"):
            sh("userdel", "relayd", check=False)
        if not had_group and _exists(grp.getgrnam, "relayd"):
            sh("groupdel", "relayd", check=False)


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def owner_and_mode(path: Path) -> tuple[str, str, str]:
    info = path.stat()
    return (pwd.getpwuid(info.st_uid).pw_name, grp.getgrgid(info.st_gid).gr_name,
            oct(stat.S_IMODE(info.st_mode)))


def unit_path() -> Path:
    """Where debhelper put the unit: /lib on Debian 12, /usr/lib from Debian 13."""
    found = [p for p in (Path("/usr/lib/systemd/system/relayd.service"),
                         Path("/lib/systemd/system/relayd.service")) if p.is_file()]
    assert found, "no relayd.service installed"
    return found[0]


class TestInstalled:
    def test_dpkg_knows_it_at_the_projects_version(self, installed: Path) -> None:
        """dpkg reports the package installed, at pyproject's version."""
        status = sh("dpkg-query", "-W", "-f", "${Status} ${Version}", "relayd").stdout
        assert status.startswith("install ok installed ")
        assert status.split()[-1].startswith(f"{VERSION}-")
        assert sh(str(RELAYD), "--version").stdout.strip() == f"relayd {VERSION}"

    def test_user_and_directories(self, installed: Path) -> None:
        """sysusers made the relayd user, tmpfiles the directories with the docs' modes."""
        user = pwd.getpwnam("relayd")
        assert (user.pw_dir, user.pw_shell) == ("/var/lib/relayd", "/usr/sbin/nologin")
        assert user.pw_uid < 1000, "a system user"
        assert owner_and_mode(Path("/etc/relayd")) == ("root", "relayd", "0o750")
        assert owner_and_mode(Path("/etc/relayd/keys")) == ("root", "root", "0o700")
        assert owner_and_mode(Path("/var/lib/relayd")) == ("relayd", "relayd", "0o700")

    def test_shipped_files(self, installed: Path) -> None:
        """The unit, the example config, the dashboard, the alerts, the broker config and
        the bash completion are where the docs say."""
        pairs = {
            unit_path(): "deploy/relayd.service",
            unit_path().with_name("relayd-vault.service"): "deploy/relayd-vault.service",
            Path("/etc/relayd/relayd.example.yaml"): "config/relayd.example.yaml",
            Path("/usr/share/relayd/grafana/relayd.json"): "deploy/grafana/relayd.json",
            Path("/usr/share/relayd/prometheus/relayd-alerts.yml"):
                "deploy/prometheus/relayd-alerts.yml",
            Path("/usr/share/relayd/rabbitmq/rabbitmq.conf"): "deploy/rabbitmq/rabbitmq.conf",
        }
        for installed_path, source in pairs.items():
            assert filecmp.cmp(installed_path, ROOT / source, shallow=False), installed_path
        completion = Path("/usr/share/bash-completion/completions/relayd").read_text()
        assert completion == sh(str(RELAYD), "completion").stdout
        conffiles = sh("dpkg-query", "-W", "-f", "${Conffiles}", "relayd").stdout
        assert "/etc/relayd/relayd.example.yaml" in conffiles

    def test_unit_verifies_against_the_installed_binary(self, installed: Path) -> None:
        """systemd-analyze verify accepts the installed unit, ExecStart and all."""
        if shutil.which("systemd-analyze") is None:
            pytest.skip("needs systemd-analyze")
        result = sh("systemd-analyze", "verify", str(unit_path()), check=False)
        complaints = [line for line in result.stderr.splitlines() if "relayd" in line]
        assert (result.returncode, complaints) == (0, [])

    def test_the_venv_is_whole_and_names_no_build_path(self, installed: Path) -> None:
        """Every compiled extension in the venv loads (the package strips them), and the
        scripts and byte code name /opt/relayd, not the build directory."""
        probe = """
import importlib, json, pathlib, sys
site = next(pathlib.Path(p) for p in sys.path if p.endswith("site-packages"))
failed = []
for so in site.rglob("*.so"):
    parts = so.relative_to(site).with_suffix("").parts
    name = ".".join((*parts[:-1], parts[-1].split(".")[0]))
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
import relayd.cli
print(json.dumps({"failed": failed, "code": relayd.cli.main.__code__.co_filename,
                  "python": sys.executable, "prefix": sys.prefix}))
"""
        found = json.loads(sh(str(VENV / "bin" / "python"), "-c", probe, cwd="/").stdout)
        assert found["failed"] == []
        assert found["code"].startswith(f"{VENV}/lib/python3")
        assert (found["python"], found["prefix"]) == (f"{VENV}/bin/python", str(VENV))
        assert os.path.realpath(VENV / "bin" / "python").startswith("/usr/bin/python3")
        leaked = sh("grep", "-rIl", "build/deb", str(VENV), check=False).stdout
        assert leaked == ""

    async def test_runs_as_relayd_with_keys_as_credentials(self, installed: Path) -> None:
        """As the relayd user, with the keys handed over as systemd credentials: the
        topology is declared, the store created in /var/lib/relayd, and `relayd run`
        becomes ready and stops cleanly on SIGTERM."""
        vhost = f"relayd-test-deb-{secrets.token_hex(4)}"
        sh("rabbitmqctl", "add_vhost", vhost)
        sh("rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        credentials = Path(tempfile.mkdtemp(prefix="relayd-credentials-"))
        config = Path("/etc/relayd/relayd.yaml")
        try:
            _configure(config, vhost, credentials)
            assert owner_and_mode(Path("/var/lib/relayd/relayd.db"))[0] == "relayd"
            process = await asyncio.create_subprocess_exec(
                str(RELAYD), "run", "--config", str(config), **as_relayd(credentials),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            try:
                ready = await asyncio.wait_for(_line_with(process, "ready"), 60)
                assert ready["version"] == VERSION
                process.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(process.wait(), 60) == 0
            finally:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
        finally:
            shutil.rmtree(credentials, ignore_errors=True)
            sh("rabbitmqctl", "delete_vhost", vhost, check=False)

    def test_installed_again_over_itself(self, installed: Path) -> None:
        """dpkg -i of the same package again (the upgrade path) keeps the operator's
        config, keys and store, and the modes."""
        before = {p: p.read_bytes() for p in (Path("/etc/relayd/relayd.yaml"),
                                             *Path("/etc/relayd/keys").iterdir())}
        assert len(before) > 1, "runs after the test that writes the config and keys"
        Path("/etc/relayd/keys").chmod(0o755)  # a mode changed by hand is put back
        sh("dpkg", "-i", str(installed))
        assert {p: p.read_bytes() for p in before} == before
        assert Path("/var/lib/relayd/relayd.db").is_file()
        assert owner_and_mode(Path("/etc/relayd/keys")) == ("root", "root", "0o700")

    def test_purge_keeps_keys_and_store(self, installed: Path) -> None:
        """dpkg --purge removes the program, the unit and the conffiles, and leaves the
        relay's keys and store, which no package may take away."""
        sh("dpkg", "--purge", "relayd")
        assert sh("dpkg-query", "-W", "relayd", check=False).returncode != 0
        assert not VENV.exists()
        assert not Path("/etc/relayd/relayd.example.yaml").exists()
        assert not any(p.exists() for p in (Path("/usr/lib/systemd/system/relayd.service"),
                                            Path("/lib/systemd/system/relayd.service")))
        assert (Path("/etc/relayd/keys") / "opaque.json").is_file()
        assert Path("/var/lib/relayd/relayd.db").is_file()


def _configure(config: Path, vhost: str, credentials: Path) -> None:
    """The config as the operations guide writes it, keys made by root, a copy of them in
    `credentials` for the relayd user, as systemd's LoadCredential= makes it; then the
    topology declared as relayd."""
    config.write_text(yaml.safe_dump({
        "amqp": {"url": f"amqp://guest:guest@127.0.0.1:5672/{vhost}"},
        "store": {"url": "sqlite:////var/lib/relayd/relayd.db"},
        "keys": {"dir": "/etc/relayd/keys"},
        "logging": {"format": "json"},
        "metrics": {"port": 0},
    }))
    shutil.chown(config, "root", "relayd")
    config.chmod(0o640)
    sh(str(RELAYD), "keys", "generate", "--config", str(config), cwd="/")
    for key in Path("/etc/relayd/keys").iterdir():
        shutil.copy(key, credentials / f"keys_{key.name}")
    for path in (credentials, *credentials.iterdir()):
        shutil.chown(path, "relayd", "relayd")
    declared = subprocess.run([str(RELAYD), "topology", "declare", "--config", str(config)],
                              capture_output=True, text=True, timeout=120, check=False,
                              **as_relayd(credentials))
    assert declared.returncode == 0, declared.stderr


async def _line_with(process: asyncio.subprocess.Process, event: str) -> dict[str, object]:
    """The first JSON log line of `process` whose event is `event`."""
    assert process.stdout is not None
    async for raw in process.stdout:
        with contextlib.suppress(ValueError):
            line = json.loads(raw)
            if isinstance(line, dict) and line.get("event") == event:
                return line
    raise AssertionError(f"{event} never logged")
