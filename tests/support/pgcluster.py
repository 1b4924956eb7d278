"""A private PostgreSQL cluster for one test: initdb in a temporary directory, a port the
kernel picked, loopback only, stopped and deleted afterwards. For tests that must read the
server's own files (heap, indexes, WAL), take base backups or run a streaming replica,
which the machine's shared server does not allow."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.broker import free_port

BIN = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                          check=False).stdout.strip() or "/usr/lib/postgresql/15/bin")
OWNER = "postgres"  # initdb refuses to run as root


def _as_owner() -> list[str]:
    return ["runuser", "-u", OWNER, "--"] if os.geteuid() == 0 else []


def run(*args: str | Path) -> str:
    done = subprocess.run([*_as_owner(), *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(str(args[0])).name} failed: {done.stderr[-2000:]}")
    return done.stdout


@dataclass
class Server:
    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.data.parent / f"{self.data.name}.log"

    def configure(self) -> None:
        with (self.data / "postgresql.auto.conf").open("a") as conf:
            conf.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.data.parent}'\n"
                       "wal_level = replica\nmax_wal_senders = 4\nfsync = off\n"
                       "hot_standby = on\n")

    def start(self) -> None:
        run(BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "start")

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            run(BIN / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")


class Cluster:
    """A primary; replicas and base backups of it; every server stopped on exit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[Server] = []
        self.primary = Server(root / "primary", free_port())
        run(BIN / "initdb", "-D", self.primary.data, "-U", "postgres", "--auth=trust",
            "--no-sync", "-E", "UTF8")
        self.primary.configure()
        self.primary.start()
        self.servers.append(self.primary)

    def base_backup(self, name: str, *, replica: bool = False) -> Server:
        """A base backup of the primary into `name`, with its WAL; started as a streaming
        replica if `replica`, on a replication slot of its own: the primary keeps the WAL
        a replica slowed by a busy machine has yet to replay (without one, a checkpoint
        may recycle it, and the replica never catches up)."""
        server = Server(self.root / name, free_port())
        run(BIN / "pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary.port),
            "-U", "postgres", "-D", server.data, "-X", "stream", "--no-sync",
            "--checkpoint=fast",  # else it waits for a spread checkpoint: minutes
            *(["-R", "-C", "-S", f"relayd_{name}"] if replica else []))
        if replica:
            server.configure()
            server.start()
            self.servers.append(server)
        return server

    def start_copy(self, server: Server) -> None:
        """Start a base backup as a server of its own (on its own port)."""
        server.configure()
        server.start()
        self.servers.append(server)

    def close(self) -> None:
        for server in reversed(self.servers):
            server.stop()


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="relayd-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam(OWNER)
        os.chown(root, owner.pw_uid, owner.pw_gid)
    started = None
    try:
        started = Cluster(root)
        yield started
    finally:
        if started is not None:
            started.close()
        shutil.rmtree(root, ignore_errors=True)


def files_holding(root: Path, needles: list[bytes]) -> list[tuple[str, str]]:
    """Every (file relative to root, needle) where a file under root holds a needle."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            content = path.read_bytes()
            found += [(str(path.relative_to(root)), n.decode(errors="backslashreplace"))
                      for n in needles if n in content]
    return found
