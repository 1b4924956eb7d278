"""A 3-node RabbitMQ cluster on this machine, whose nodes and hosts a test can cut off.

Each node is a tests/support/broker.py TestBroker that runs in a network namespace of
its own. The namespaces hang off a bridge in a hub namespace through veth pairs, and the
test's own (root) namespace joins the hub through one more veth pair, with an address of
198.18.N.0/24 (RFC 2544's range for tests; N is picked free per cluster):

    root 198.18.N.1 ──┐
    node 0 .10 ───────┤ hub namespace: bridge
    node 1 .11 ───────┤
    node 2 .12 ───────┤
    host "a" .100 ────┘ (a relayd host of the test, see Cluster.host)

Cutting a link (`cut`) takes the hub's end of its veth pair down: packets to and from
that namespace are dropped silently, as in a real partition, and every TCP connection
through it is left half-open. `heal` brings it back.

Beside the nodes:
- `balancer()`: a TCP load balancer (tests/support/balancer.py) on the root address, as
  a production installation puts in front of the nodes;
- `forward(port)`: a socat forwarder from the root address to 127.0.0.1:`port` (the
  machine's PostgreSQL listens on loopback only), that `freeze` stops answering;
- `host(name)`: a namespace for a relayd host, whose link can be cut.

`close()` stops the nodes, kills whatever still runs in the namespaces, and deletes the
namespaces and the root's veth; `sweep()` does the same for clusters whose test process
died. Every name starts with `relayd-c<pid>-`.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.broker import TestBroker, free_ports, pid_alive, wait_pid_gone

PREFIX = "relayd-c"
# A node's scheduler busy-waiting would take a core each on a 2-core machine; a node that
# goes silent is taken for down after 10 s (net_ticktime) instead of 60, to keep tests short.
ERL_ARGS = "+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none -kernel net_ticktime 10"
CONF = """\
cluster_formation.peer_discovery_backend = classic_config
cluster_partition_handling = pause_minority
management_agent.disable_metrics_collector = true
# guest from the test's own address: the nodes are on private namespace addresses only
loopback_users = none
"""
WAIT = 90.0


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


def _netns() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line]


def _kill_namespace(name: str) -> None:
    """Kill every process in namespace `name` (ours: nodes, epmd, relayd), then delete it."""
    pids = [int(p) for p in ip("netns", "pids", name, check=False).stdout.split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        wait_pid_gone(pid, 10)
    ip("netns", "del", name, check=False)


def _each(nodes: list[TestBroker], action: Callable[[TestBroker], None]) -> None:
    """`action` on every node at once; the first error, once all are done."""
    with ThreadPoolExecutor(len(nodes) or 1) as pool:
        for future in [pool.submit(action, node) for node in nodes]:
            future.result()


def sweep() -> None:
    """Remove what clusters of dead test processes left behind."""
    for name in _netns():
        found = re.fullmatch(rf"{PREFIX}(\d+)-(\d+)-.*", name)
        if found and not pid_alive(int(found[1])):
            _kill_namespace(name)
            ip("link", "del", f"rc{found[2]}", check=False)


@dataclass
class Host:
    """A namespace of its own for a relayd host, linked to the hub."""

    name: str
    netns: str
    address: str
    cluster: Cluster

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def cut(self) -> None:
        self.cluster.cut_link(f"h-{self.name}")

    def heal(self) -> None:
        self.cluster.heal_link(f"h-{self.name}")


@dataclass
class Forwarder:
    """socat from the root address to 127.0.0.1:target: a link to a service on loopback."""

    port: int
    process: subprocess.Popen[bytes]

    def freeze(self) -> None:
        """Stop answering, with every connection left open: a half-open link."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGCONT)
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


@dataclass
class Cluster:
    """Three (`size`) clustered nodes, each in its own network namespace."""

    base_dir: Path
    size: int = 3
    extra_conf: str = ""
    advanced_config: str = ""
    nodes: list[TestBroker] = field(default_factory=list)
    hosts: dict[str, Host] = field(default_factory=dict)
    helpers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    forwarders: list[Forwarder] = field(default_factory=list)
    subnet: int = 0
    _namespaces: list[str] = field(default_factory=list)

    @property
    def root(self) -> str:
        """The test's own address on the hub."""
        return f"198.18.{self.subnet}.1"

    @property
    def hub(self) -> str:
        return self._name("hub")

    def _name(self, what: str) -> str:
        return f"{PREFIX}{os.getpid()}-{self.subnet}-{what}"

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        sweep()
        try:
            self._network()
            cookie = secrets.token_hex(20).upper()
            for i in range(self.size):
                self.nodes.append(self._node(i, cookie))
            # The nodes find each other at their first boot (classic_config peer
            # discovery), so they start at the same time.
            _each(self.nodes, lambda node: node.start(timeout=WAIT))
            self.nodes[0].ctl("await_online_nodes", str(self.size))
        except BaseException:
            self.close()
            raise

    def _network(self) -> None:
        used = {int(m[1]) for m in re.finditer(r"198\.18\.(\d+)\.",
                                                ip("route").stdout + ip("addr").stdout)}
        used |= {int(m[1]) for m in re.finditer(rf"{PREFIX}\d+-(\d+)-", " ".join(_netns()))}
        self.subnet = random.choice([n for n in range(1, 255) if n not in used])
        self._add_namespace(self.hub)
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        root_link = f"rc{self.subnet}"
        ip("link", "add", root_link, "type", "veth", "peer", "name", "root", "netns", self.hub)
        ip("-n", self.hub, "link", "set", "root", "master", "br0", "up")
        ip("addr", "add", f"{self.root}/24", "dev", root_link)
        ip("link", "set", root_link, "up")

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _attach(self, link: str, netns: str, address: str) -> None:
        """Link namespace `netns` to the hub (its end: eth0 with `address`)."""
        self._add_namespace(netns)
        ip("-n", self.hub, "link", "add", link, "type", "veth", "peer", "name", "eth0",
           "netns", netns)
        ip("-n", self.hub, "link", "set", link, "master", "br0", "up")
        ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")

    def _node(self, i: int, cookie: str) -> TestBroker:
        netns, address = self._name(f"n{i}"), f"198.18.{self.subnet}.{10 + i}"
        self._attach(f"n-{i}", netns, address)
        base = self.base_dir / f"node-{i}"
        base.mkdir(parents=True, exist_ok=True)
        fd = os.open(base / ".erlang.cookie", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "w") as f:
            f.write(cookie)  # the same on every node: they may talk to each other
        peers = "".join(f"cluster_formation.classic_config.nodes.{n + 1} = "
                        f"relayd-c{n}@198.18.{self.subnet}.{10 + n}\n" for n in range(self.size))
        return TestBroker(base, node_name=f"relayd-c{i}", host=address, netns=netns,
                          erl_args=ERL_ARGS, extra_conf=CONF + peers + self.extra_conf,
                          advanced_config=self.advanced_config)

    def close(self) -> None:
        """Stop and remove everything; safe to call more than once, and after a failure."""
        for forwarder in self.forwarders:
            forwarder.stop()
        for helper in self.helpers:
            with contextlib.suppress(ProcessLookupError):
                helper.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                helper.wait(10)
            if helper.stdout is not None:  # a balancer's, that told its port
                helper.stdout.close()
        for i in range(len(self.nodes)):
            self.heal(i)
        with contextlib.suppress(Exception):  # what is left is killed with its namespace
            _each(self.nodes, TestBroker.kill)  # what they held is thrown away anyway
        for name in reversed(self._namespaces):
            _kill_namespace(name)
        if self.subnet:
            ip("link", "del", f"rc{self.subnet}", check=False)
        self.forwarders, self.helpers, self._namespaces = [], [], []

    # --- faults ----------------------------------------------------------------------

    def cut_link(self, link: str) -> None:
        ip("-n", self.hub, "link", "set", link, "down")

    def heal_link(self, link: str) -> None:
        ip("-n", self.hub, "link", "set", link, "up", check=False)

    def cut(self, i: int) -> None:
        """Cut node `i` off from the other nodes and from every client."""
        self.cut_link(f"n-{i}")

    def heal(self, i: int) -> None:
        self.heal_link(f"n-{i}")

    def stop(self, i: int) -> None:
        self.nodes[i].stop()

    def start_node(self, i: int) -> None:
        """Start a stopped node again; it rejoins the cluster with its data."""
        self.nodes[i].start(timeout=WAIT)

    def running(self, i: int) -> list[str]:
        """The nodes that node `i` sees running."""
        out = self.nodes[i].ctl("eval", "rabbit_nodes:all_running().")
        return re.findall(r"'([^']+)'", out)

    # --- around the nodes ------------------------------------------------------------

    def host(self, name: str) -> Host:
        """A namespace for a relayd host, linked to the hub."""
        if name not in self.hosts:
            address = f"198.18.{self.subnet}.{100 + len(self.hosts)}"
            netns = self._name(f"h-{name}")
            self._attach(f"h-{name}", netns, address)
            self.hosts[name] = Host(name, netns, address, self)
        return self.hosts[name]

    def balancer(self, nodes: list[int] | None = None) -> int:
        """Start a TCP load balancer over the nodes' AMQP ports; return its port, on the
        root address (reachable from the hosts too)."""
        upstreams = [f"{n.host}:{n.amqp_port}" for i, n in enumerate(self.nodes)
                     if nodes is None or i in nodes]
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.balancer", "--listen", f"{self.root}:0",
             *upstreams], stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
        self.helpers.append(process)
        assert process.stdout is not None
        return int(process.stdout.readline())

    def forward(self, target: int) -> Forwarder:
        """A forwarder from the root address to 127.0.0.1:`target`."""
        forwarder = forward(self.root, target)
        self.forwarders.append(forwarder)
        return forwarder


def forward(address: str, target: int) -> Forwarder:
    """socat from `address` (a free port on it) to 127.0.0.1:`target`; the caller stops it."""
    [port] = free_ports(1)
    process = subprocess.Popen(
        ["socat", f"TCP-LISTEN:{port},bind={address},fork,reuseaddr",
         f"TCP:127.0.0.1:{target}"], start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    forwarder = Forwarder(port, process)
    deadline = time.monotonic() + 10
    while True:  # socat offers no event for "listening"
        with contextlib.suppress(OSError):
            socket.create_connection((address, port), timeout=1).close()
            return forwarder
        if time.monotonic() > deadline:
            forwarder.stop()
            raise TimeoutError("socat did not listen")
        time.sleep(0.05)
