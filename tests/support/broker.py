"""Start and stop a dedicated RabbitMQ node for tests.

Everything the node uses lives under ``base_dir``: config, Erlang cookie (``HOME`` points
there), data, logs, pid file and TLS material. The node has its own name and ports, so the
machine's shared broker (``rabbit@localhost``) is never touched.

The node runs from ``/usr/lib/rabbitmq/bin``: the Debian wrappers on ``PATH`` would
``su rabbitmq`` and drop our environment, and ``/etc/rabbitmq/rabbitmq-env.conf`` would name
the node ``rabbit@localhost``, so ``RABBITMQ_CONF_ENV_FILE`` points at an empty file of ours.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import ipaddress
import json
import os
import random
import re
import secrets
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import AuthorityKeyIdentifier
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
# 4369 epmd, 5672/25672 the shared node, 35672-35682 rabbitmqctl's own distribution ports.
RESERVED_PORTS = frozenset({4369, 5672, 25672, *range(35672, 35683)})
PLUGINS = "[rabbitmq_management,rabbitmq_auth_mechanism_ssl]."
STATE_FILE = "state.json"

CertKey = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _bin(name: str) -> str:
    path = RABBITMQ_BIN / name
    return str(path) if path.exists() else shutil.which(name) or name


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct ports that were free on 127.0.0.1 a moment ago, chosen
    at random below the kernel's ephemeral range: the kernel never hands one of those to
    an outgoing connection, which could otherwise take a port between our pick and the
    server's bind (the other tests running beside this one connect all the time)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = range(10_000, max(low, 20_000))
    ports: list[int] = []
    # SystemRandom: a test may have seeded the module's generator (Hypothesis does)
    for port in random.SystemRandom().sample(candidates, k=min(count + 256, len(candidates))):
        if len(ports) == count:
            return ports
        if port in RESERVED_PORTS:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    if len(ports) == count:
        return ports
    raise RuntimeError("could not find free ports")


def free_port() -> int:
    """One port, as free_ports() picks them."""
    [port] = free_ports(1)
    return port


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has exited; True if it did within ``timeout`` seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        select.select([fd], [], [], timeout)  # readable once the process has exited
    finally:
        os.close(fd)
    return not pid_alive(pid)


# --- TLS ---------------------------------------------------------------------------------


def _issue(cn: str, issuer: CertKey | None, kind: Literal["ca", "server", "client"]) -> CertKey:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_name, signer = (name, key) if issuer is None else (issuer[0].subject, issuer[1])
    now = datetime.datetime.now(datetime.UTC)
    ca = kind == "ca"
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False)
    )
    if kind != "ca":
        usage = (
            ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if kind == "server":
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(signer, hashes.SHA256()), key


def _save(pair: CertKey, cert_path: Path, key_path: Path) -> tuple[Path, Path]:
    cert_path.write_bytes(pair[0].public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        pair[1].private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _load(cert_path: Path, key_path: Path) -> CertKey:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return x509.load_pem_x509_certificate(cert_path.read_bytes()), key


# --- the node ----------------------------------------------------------------------------


@dataclass
class TestBroker:
    """A throwaway RabbitMQ node with AMQP, AMQPS (client certs) and management on 127.0.0.1.

    Ports left at 0 are picked free; ``node_name`` defaults to one derived from ``base_dir``,
    so a later run in the same directory reuses the node's data. With ``netns`` the node
    runs in that network namespace, listening on ``host`` (an address there) and named
    ``...@host`` (Erlang long names): a member of a cluster that tests/support/cluster.py
    can cut off. With ``conf_file`` (and
    ``plugins_file``) the node runs that config instead, e.g. the production one in
    deploy/rabbitmq, with only its host-specific values (addresses, ports, certificate
    paths, disk limit) replaced by this node's: see ``render``.
    """

    __test__ = False  # not a pytest test class

    base_dir: Path
    node_name: str = ""
    amqp_port: int = 0
    amqps_port: int = 0
    mgmt_port: int = 0
    dist_port: int = 0
    prometheus_port: int = 0  # rabbitmq_prometheus, where the config enables it
    extra_conf: str = ""
    advanced_config: str = ""  # Erlang terms for settings rabbitmq.conf has no key for
    conf_file: Path | None = None
    plugins_file: Path | None = None
    host: str = "127.0.0.1"
    netns: str | None = None
    # more flags for the Erlang VM; by default its schedulers do not busy-wait, which on a
    # 2-core machine would take CPU from every other test (the shared broker runs so too)
    erl_args: str = "+sbwt none +sbwtdcpu none +sbwtdio none"
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _pid: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir).resolve()
        if not self.node_name:
            digest = hashlib.sha256(str(self.base_dir).encode()).hexdigest()[:10]
            self.node_name = f"relayd-test-{digest}"
        if "@" not in self.node_name:
            self.node_name += "@localhost" if self.loopback else f"@{self.host}"
        names = ("amqp_port", "amqps_port", "mgmt_port", "dist_port", "prometheus_port")
        picked = iter(free_ports(sum(getattr(self, n) == 0 for n in names)))
        for n in names:
            if getattr(self, n) == 0:
                setattr(self, n, next(picked))

    # paths and URLs

    @property
    def loopback(self) -> bool:
        return self.host == "127.0.0.1"

    def command(self, *argv: str) -> list[str]:
        """``argv`` run where the node runs (in its network namespace, if it has one)."""
        return [*(("ip", "netns", "exec", self.netns) if self.netns else ()), *argv]

    @property
    def tls_dir(self) -> Path:
        return self.base_dir / "tls"

    @property
    def ca_cert(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.tls_dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.tls_dir / "server.key"

    @property
    def other_ca_cert(self) -> Path:
        """A CA the node does not trust."""
        return self.tls_dir / "other-ca.pem"

    @property
    def other_client_cert(self) -> tuple[Path, Path]:
        """(cert, key) of a client certificate issued by the untrusted other CA."""
        return self.tls_dir / "other-client.pem", self.tls_dir / "other-client.key"

    @property
    def pid_file(self) -> Path:
        return self.base_dir / "rabbitmq.pid"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "log" / f"{self.node_name}.log"

    @property
    def pid(self) -> int | None:
        """OS pid of the node's Erlang VM while started."""
        return self._pid

    @property
    def plain_listener(self) -> bool:
        """False when the config turns the plain AMQP listener off (listeners.tcp = none)."""
        return "none" not in _settings(self._config()).get("listeners.tcp", [])

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@{self.host}:{self.amqp_port}/"

    @property
    def amqps_url(self) -> str:
        return f"amqps://guest:guest@{self.host}:{self.amqps_port}/"

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.host}:{self.prometheus_port}/metrics"

    @property
    def mgmt_url(self) -> str:
        https = any(k.startswith("management.ssl.") for k in _settings(self._config()))
        return f"{'https' if https else 'http'}://{self.host}:{self.mgmt_port}"

    # TLS

    def make_client_cert(self, cn: str, *, other_ca: bool = False) -> tuple[Path, Path]:
        """Issue a client certificate for ``cn`` from our CA (or the untrusted other CA)."""
        self._ensure_tls()
        ca = "other-ca" if other_ca else "ca"
        issuer = _load(self.tls_dir / f"{ca}.pem", self.tls_dir / f"{ca}.key")
        stem = f"client-{'other-' if other_ca else ''}{re.sub(r'[^A-Za-z0-9_.-]', '_', cn)}"
        pair = _issue(cn, issuer, "client")
        return _save(pair, self.tls_dir / f"{stem}.pem", self.tls_dir / f"{stem}.key")

    def ssl_context_for_client(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        """A client context trusting our CA, presenting ``cert`` = (cert, key) if given."""
        self._ensure_tls()
        context = ssl.create_default_context(cafile=self.ca_cert)
        if cert is not None:
            context.load_cert_chain(cert[0], cert[1])
        return context

    def _ensure_tls(self) -> None:
        tls = self.tls_dir
        if self.other_client_cert[1].exists():
            return
        tls.mkdir(parents=True, exist_ok=True)
        ca = _issue("relayd-test-ca", None, "ca")
        _save(ca, self.ca_cert, tls / "ca.key")
        _save(_issue("localhost", ca, "server"), self.server_cert, self.server_key)
        other = _issue("relayd-test-other-ca", None, "ca")
        _save(other, self.other_ca_cert, tls / "other-ca.key")
        _save(_issue("other-client", other, "client"), *self.other_client_cert)

    # lifecycle

    def env(self) -> dict[str, str]:
        """Environment for rabbitmq-server and rabbitmqctl talking to this node."""
        base = self.base_dir
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("RABBITMQ_") and k not in ("ERL_FLAGS", "ERL_AFLAGS", "ERL_ZFLAGS")
        }
        env.update(
            HOME=str(base),  # the Erlang cookie is $HOME/.erlang.cookie
            RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.node_name,
            RABBITMQ_NODE_IP_ADDRESS=self.host,
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_CONFIG_FILES=str(base / "conf.d"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_MNESIA_DIR=str(base / "mnesia" / self.node_name),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_PID_FILE=str(self.pid_file),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                f"-kernel inet_dist_use_interface {{{self.host.replace('.', ',')}}} "
                + self.erl_args),
        )
        if not self.loopback:
            env["RABBITMQ_USE_LONGNAME"] = "true"
        return env

    def render(self, text: str) -> str:
        """``text`` (a rabbitmq.conf) with its host-specific values replaced by this node's."""
        lines = []
        for line in text.splitlines():
            key, _, value = (part.strip() for part in line.partition("="))
            if key.startswith("disk_free_limit."):  # the machine's disk is shared with others
                key, value = "disk_free_limit.absolute", "50MB"
            lines.append(f"{key} = {self._local(key, value)}"
                         if value and not key.startswith("#") else line)
        return "\n".join([*lines, "log.console = false", "log.file.level = info",
                          self.extra_conf, ""])

    def _local(self, key: str, value: str) -> str:
        """This node's value for a host-specific setting; any other value unchanged."""
        last = key.rpartition(".")[2]
        tls = {"cacertfile": self.ca_cert, "certfile": self.server_cert,
               "keyfile": self.server_key}
        if key.startswith("listeners.ssl."):
            return f"{self.host}:{self.amqps_port}"
        if key.startswith("listeners.tcp.") and value != "none":
            return f"{self.host}:{self.amqp_port}"
        if key.startswith(("ssl_options.", "management.ssl.")) and last in tls:
            return str(tls[last])
        if key.startswith("management.") and last in ("port", "ip"):
            return str(self.mgmt_port) if last == "port" else self.host
        if key.startswith("prometheus.tcp.") and last in ("port", "ip"):
            return str(self.prometheus_port) if last == "port" else self.host
        return value

    def _config(self) -> str:
        if self.conf_file is not None:
            return self.render(self.conf_file.read_text())
        return f"""\
listeners.tcp.default = {self.host}:{self.amqp_port}
listeners.ssl.default = {self.host}:{self.amqps_port}
ssl_options.cacertfile = {self.ca_cert}
ssl_options.certfile = {self.server_cert}
ssl_options.keyfile = {self.server_key}
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
ssl_options.versions.1 = tlsv1.3
ssl_options.versions.2 = tlsv1.2
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = AMQPLAIN
auth_mechanisms.3 = EXTERNAL
ssl_cert_login_from = common_name
management.tcp.ip = {self.host}
management.tcp.port = {self.mgmt_port}
disk_free_limit.absolute = 50MB
log.console = false
log.file.level = info
{self.extra_conf}
"""

    def _write_files(self) -> None:
        base = self.base_dir
        for d in (base / "conf.d", base / "mnesia", base / "log"):
            d.mkdir(parents=True, exist_ok=True)
        self._ensure_tls()
        cookie = base / ".erlang.cookie"
        if not cookie.exists():
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(20).upper())
        # Ours, so that /etc/rabbitmq/rabbitmq-env.conf (NODENAME=rabbit@localhost) is not read.
        (base / "rabbitmq-env.conf").write_text("")
        (base / "rabbitmq.conf").write_text(self._config())
        plugins = self.plugins_file.read_text() if self.plugins_file else PLUGINS + "\n"
        (base / "enabled_plugins").write_text(plugins)
        if self.advanced_config:
            (base / "advanced.config").write_text(self.advanced_config + "\n")

    def start(self, timeout: float = 60) -> None:
        """Start the node (reusing any data in ``base_dir``) and wait until it serves."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self.stop()  # a leftover node of a previous run in this directory
        self._write_files()
        self.pid_file.unlink(missing_ok=True)
        with (self.base_dir / "log" / "server-stdout.log").open("ab") as out:
            self._proc = subprocess.Popen(
                self.command(_bin("rabbitmq-server")),
                cwd=self.base_dir,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._await_startup(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        self._pid = int(self.pid_file.read_text().strip())
        (self.base_dir / STATE_FILE).write_text(json.dumps(self.describe(), indent=2) + "\n")

    def _await_startup(self, deadline: float) -> None:
        assert self._proc is not None
        for _ in range(1000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"rabbitmq-server exited with {self._proc.returncode}; {self._log_tail()}"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                done = self._run_ctl(
                    "await_startup", "--timeout", str(int(remaining) + 1), timeout=remaining
                )
                if done.returncode == 0 and self._ports_open():
                    return
            # Not up yet: wait for a crash of the server (or the retry interval) instead of
            # sleeping.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=min(0.5, max(deadline - time.monotonic(), 0.01)))
        raise TimeoutError(f"{self.node_name} did not start in time; {self._log_tail()}")

    def _log_tail(self, lines: int = 15) -> str:
        try:
            tail = self.log_file.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            tail = []
        return "\n".join([f"last lines of {self.log_file}:", *tail])

    def _ports_open(self) -> bool:
        ports = (self.amqp_port,) if self.plain_listener else ()
        for port in (*ports, self.amqps_port, self.mgmt_port):
            try:
                socket.create_connection((self.host, port), timeout=1).close()
            except OSError:
                return False
        return True

    def stop(self, timeout: float = 30) -> None:
        """Stop the node and make sure its processes are gone. Idempotent."""
        pid = self._our_live_pid()
        if pid is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._run_ctl("stop", str(self.pid_file), timeout=timeout)
            if not wait_pid_gone(pid, timeout):
                with contextlib.suppress(ProcessLookupError):
                    _kill_group(os.getpgid(pid), pid)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(self._proc.pid, self._proc.pid)
                self._proc.wait(timeout=timeout)
        self._proc = None
        self._pid = None

    def kill(self) -> None:
        """Kill the node with SIGKILL, as a crash would (a graceful stop takes ~7 s)."""
        pid = self._our_live_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not wait_pid_gone(pid, 10):
                raise RuntimeError(f"process {pid} survived SIGKILL")
        self.stop()

    def restart(self, timeout: float = 60, *, graceful: bool = True) -> None:
        """Stop (or kill) the node and start it again with the same ports and data."""
        if graceful:
            self.stop()
        else:
            self.kill()
        self.start(timeout)

    def _our_live_pid(self) -> int | None:
        pid = self._pid
        if pid is None:
            with contextlib.suppress(FileNotFoundError, ValueError):
                pid = int(self.pid_file.read_text().strip())
        if pid is None or not pid_alive(pid):
            return None
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            return None
        return pid if f"RABBITMQ_PID_FILE={self.pid_file}".encode() in environ else None

    def _run_ctl(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(_bin("rabbitmqctl"), "-n", self.node_name, *args),
            env=self.env(),
            cwd=self.base_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """Run ``rabbitmqctl -n <node> *args``; return stdout, raise on failure."""
        done = self._run_ctl(*args, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} exited {done.returncode}: "
                f"{done.stderr.strip() or done.stdout.strip()}"
            )
        return done.stdout

    # state

    def describe(self) -> dict[str, Any]:
        """Everything a client needs, as saved to ``state.json``."""
        return {
            "node_name": self.node_name,
            "base_dir": str(self.base_dir),
            "pid": self._pid,
            "amqp_port": self.amqp_port,
            "amqps_port": self.amqps_port,
            "mgmt_port": self.mgmt_port,
            "dist_port": self.dist_port,
            "host": self.host,
            "netns": self.netns,
            "amqp_url": self.amqp_url,
            "amqps_url": self.amqps_url,
            "mgmt_url": self.mgmt_url,
            "ca_cert": str(self.ca_cert),
            "server_cert": str(self.server_cert),
            "server_key": str(self.server_key),
            "other_ca_cert": str(self.other_ca_cert),
            "other_client_cert": [str(p) for p in self.other_client_cert],
            "log_file": str(self.log_file),
        }

    @classmethod
    def from_state(cls, base_dir: Path) -> TestBroker:
        """The broker described by ``base_dir/state.json`` (written by ``start``)."""
        state = json.loads((Path(base_dir) / STATE_FILE).read_text())
        broker = cls(
            Path(state["base_dir"]),
            node_name=state["node_name"],
            amqp_port=state["amqp_port"],
            amqps_port=state["amqps_port"],
            mgmt_port=state["mgmt_port"],
            dist_port=state["dist_port"],
            host=state.get("host", "127.0.0.1"),
            netns=state.get("netns"),
        )
        broker._pid = state["pid"]
        return broker


def _settings(conf: str) -> dict[str, list[str]]:
    """The values of a rabbitmq.conf, by key and by key prefix (``listeners.tcp``)."""
    found: dict[str, list[str]] = {}
    for line in conf.splitlines():
        key, _, value = (part.strip() for part in line.partition("="))
        if value and not key.startswith("#"):
            found.setdefault(key, []).append(value)
            found.setdefault(key.rpartition(".")[0], []).append(value)
    return found


def _kill_group(pgid: int, pid: int) -> None:
    """SIGTERM, then SIGKILL, the process group of our node; raise if ``pid`` survives."""
    if pgid == os.getpgrp():  # never signal our own group
        raise RuntimeError(f"refusing to kill our own process group {pgid}")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        if wait_pid_gone(pid, 10):
            return
    raise RuntimeError(f"process {pid} survived SIGKILL")


def main(argv: Sequence[str] | None = None) -> int:
    """``test-broker start --dir D [--name N] [--conf F --plugins P]`` /
    ``test-broker stop --dir D``."""
    parser = argparse.ArgumentParser(prog="test-broker", description="A RabbitMQ node for tests.")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start a node, print its details as JSON")
    start.add_argument("--dir", type=Path, required=True)
    start.add_argument("--name", default="", help="node name (default: derived from --dir)")
    start.add_argument("--timeout", type=float, default=60)
    start.add_argument("--conf", type=Path, help="run this rabbitmq.conf, made local "
                       "(e.g. deploy/rabbitmq/rabbitmq.conf)")
    start.add_argument("--plugins", type=Path, help="enabled_plugins file for --conf")
    stop = commands.add_parser("stop", help="stop the node recorded in DIR/state.json")
    stop.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.command == "start":
        broker = TestBroker(args.dir, node_name=args.name, conf_file=args.conf,
                            plugins_file=args.plugins)
        broker.start(timeout=args.timeout)
        print(json.dumps(broker.describe()))
    else:
        TestBroker.from_state(args.dir).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
