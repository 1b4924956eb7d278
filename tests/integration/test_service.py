"""`relayd run` as systemd runs it: real supervisor and worker processes on a real broker.

A test here plays systemd (a datagram socket as NOTIFY_SOCKET), scrapes the supervisor's
endpoints, kills and reloads workers, and reads every log line relayd wrote.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import io
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relayd import __version__, keys, log
from relayd.client import DeviceKeys, RelayPublic
from relayd.config import Logging
from relayd.crypto import b64d, b64e
from relayd.errors import ExitCode
from tests.integration.harness import (
    WAIT,
    Relay,
    kill_group,
    relay_in_vhost,
    stop_process,
    write_config,
)
from tests.integration.test_resilience import collect, send_numbered
from tests.support.broker import free_port
from tests.support.systemd import FakeSystemd

T = TypeVar("T")
PR_SET_MDWE, PR_GET_MDWE = 65, 66


def relayd(*args: str) -> subprocess.CompletedProcess[str]:
    """A `relayd` command run to its end."""
    return subprocess.run([sys.executable, "-m", "relayd", *args], capture_output=True,
                          text=True, timeout=60)


def run_in_background(config: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`relayd run` without a Relay harness, logging next to its config."""
    with (config.parent / "relayd.log").open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "relayd", "run", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)


def http(port: int, path: str) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path; (status, body). Connection refused raises OSError."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def until(check: Callable[[], Awaitable[T | None]], wait: float = WAIT) -> T:
    """Poll `check` (external state: an endpoint, a file) until it returns something."""
    async with asyncio.timeout(wait):
        while (found := await check()) is None:  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.05)
    return found


async def status_when(port: int, condition: Callable[[dict[str, Any]], bool],
                      wait: float = WAIT) -> dict[str, Any]:
    """The supervisor's /status once `condition` holds for it."""
    async def check() -> dict[str, Any] | None:
        try:
            code, body = http(port, "/status")
        except OSError:
            return None  # not listening yet
        report: dict[str, Any] = orjson.loads(body)
        return report if code == 200 and condition(report) else None
    return await until(check, wait)


def all_up(report: dict[str, Any]) -> bool:
    """Ready, and every worker (retention too, which readiness does not wait for) runs."""
    return bool(report["ready"]) and all(
        w["state"] in ("consuming", "running") for w in report["workers"])


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, by (name, labels)."""
    code, body = http(port, "/metrics")
    assert code == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd()
    try:
        yield fake
    finally:
        fake.close()


def as_credentials(keys_dir: Path, credentials: Path) -> None:
    """The key files as systemd's LoadCredential=keys:DIR hands them over."""
    credentials.mkdir()
    for path in keys_dir.iterdir():
        shutil.copy(path, credentials / f"keys_{path.name}")


async def queue_consumers(relay: Relay, queue: str) -> int:
    declared = await relay.channel.declare_queue(queue, passive=True)
    return int(declared.declaration_result.consumer_count or 0)


class TestSystemd:
    async def test_ready_watchdog_status_stopping(self, tmp_path: Path,
                                                  systemd: FakeSystemd) -> None:
        """READY=1 comes once every worker consumes, WATCHDOG=1 pings follow, STATUS says
        how many workers consume, and SIGTERM gives STOPPING=1 and exit 0; the keys come
        from systemd credentials and the private metrics directory is cleaned up."""
        port = free_port()
        async with relay_in_vhost(tmp_path, workers={"inbound": 2, "outbound": 1},
                                  metrics={"port": port}) as relay:
            await relay.add_business("acme")
            phone = await relay.add_device("alice", "phone")
            as_credentials(relay.settings.keys.dir, tmp_path / "credentials")
            shutil.move(relay.settings.keys.dir, tmp_path / "elsewhere")
            (tmp_path / "tmp").mkdir()
            env = {**os.environ, **systemd.environment(), "TMPDIR": str(tmp_path / "tmp"),
                   "CREDENTIALS_DIRECTORY": str(tmp_path / "credentials")}
            process = relay.spawn(env=env)
            try:
                ready = await systemd.until("READY", wait=60)
                assert ready["READY"] == "1"
                assert ready["MAINPID"] == str(process.pid)
                assert ready["STATUS"].startswith("3/3 workers consuming")
                assert await queue_consumers(relay, relay.settings.topology.inbound_queue) == 2
                assert await queue_consumers(relay, relay.settings.topology.outbound_queue) == 1
                assert all(not m["STATUS"].startswith("3/3")
                           for m in systemd.received[:-1] if "STATUS" in m)
                await systemd.until("WATCHDOG")
                await systemd.until("WATCHDOG")
                assert http(port, "/healthz")[0] == 200
                assert http(port, "/readyz") == (200, b"ready\n")
                report = orjson.loads(http(port, "/status")[1])
                assert report["keys"]["source"] == "credentials"
                assert list((tmp_path / "tmp").iterdir())  # the metrics directory

                message_id = await relay.send(phone, "acme", "start")
                [event] = await relay.events("acme", 1)
                assert event["id"] == message_id

                process.send_signal(signal.SIGTERM)
                stopping = await systemd.until("STOPPING")
                assert stopping["STATUS"].startswith("stopping")
                assert process.wait(timeout=30) == ExitCode.OK
                assert list((tmp_path / "tmp").iterdir()) == []
            finally:
                kill_group(process)

    async def test_not_ready_while_workers_cannot_consume(self, tmp_path: Path,
                                                          systemd: FakeSystemd) -> None:
        """With a broker the workers cannot use, relayd is alive but neither /readyz nor
        systemd hear that it is ready; it still stops cleanly."""
        port = free_port()
        config = write_config(tmp_path, f"relayd-absent-{secrets.token_hex(4)}",
                              metrics={"port": port})
        keys.generate(tmp_path / "keys", "test-1")
        process = run_in_background(config, {**os.environ, **systemd.environment()})
        try:
            await status_when(port, lambda report: True)
            assert http(port, "/healthz")[0] == 200
            code, body = http(port, "/readyz")
            assert code == 503
            assert body.startswith(b"not ready: 0/2 workers consuming")
            await systemd.until("WATCHDOG")
            assert all("READY" not in m for m in systemd.received + systemd.pending())
            assert stop_process(process) == ExitCode.OK
        finally:
            kill_group(process)

    async def test_second_signal_forces(self, tmp_path: Path, systemd: FakeSystemd) -> None:
        """While workers cannot stop (stuck connecting to a broker that never answers, with
        a drain deadline far away), a second SIGTERM kills them and relayd exits 1."""
        held: list[asyncio.StreamWriter] = []
        silent = await asyncio.start_server(lambda _, writer: held.append(writer),
                                            "127.0.0.1", 0)
        broker = silent.sockets[0].getsockname()[1]
        port = free_port()
        config = write_config(tmp_path, "unused", metrics={"port": port},
                              workers={"shutdown_timeout": 600},
                              amqp={"url": f"amqp://guest:guest@127.0.0.1:{broker}/",
                                    "connect_timeout": 600})
        keys.generate(tmp_path / "keys", "test-1")
        process = run_in_background(config, {**os.environ, **systemd.environment()})
        try:
            report = await status_when(port, lambda r: all(w["pid"] for w in r["workers"]))
            process.send_signal(signal.SIGTERM)
            await systemd.until("STOPPING")
            assert all(alive(w["pid"]) for w in report["workers"])
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == ExitCode.FAILURE
            assert not any(alive(w["pid"]) for w in report["workers"])
        finally:
            kill_group(process)
            for writer in held:
                writer.close()
            silent.close()
            await silent.wait_closed()

    async def test_refuses_to_start_without_keys(self, tmp_path: Path) -> None:
        """A config whose keys are missing stops `relayd run` at once with exit code 78,
        before any worker starts."""
        config = write_config(tmp_path, "unused", metrics={"enabled": False})
        result = relayd("run", "--config", str(config))
        assert result.returncode == ExitCode.CONFIG
        assert "relayd keys generate" in result.stderr


class TestWorkers:
    async def test_killed_worker_is_restarted_and_nothing_is_lost(self, tmp_path: Path) -> None:
        """A worker killed with SIGKILL is started again by the supervisor, the restart is
        counted, every message arrives, and the counts add up over all processes."""
        port = free_port()
        async with relay_in_vhost(tmp_path, workers={"inbound": 2},
                                  metrics={"port": port}) as relay:
            await relay.add_business("acme")
            expected = await send_numbered(relay, 100)
            process = relay.spawn()
            try:
                before = await status_when(port, all_up, wait=60)
                victim = next(w for w in before["workers"] if w["role"] == "inbound")
                os.kill(victim["pid"], signal.SIGKILL)
                after = await status_when(port, lambda r: all_up(r) and any(
                    w["restarts"] == 1 for w in r["workers"]), wait=60)
                [restarted] = [w for w in after["workers"] if w["name"] == victim["name"]]
                assert restarted["pid"] != victim["pid"]
                seen, _ = await collect(relay, expected)
                assert seen == expected
                samples = scrape(port)
                assert sample(samples, "relayd_worker_restarts_total", role="inbound") == 1
                assert sample(samples, "relayd_worker_restarts_total", role="outbound") == 0
                assert sample(samples, "relayd_workers_consuming", role="inbound") == 2
                assert stop_process(process) == ExitCode.OK
            finally:
                kill_group(process)


    async def test_workers_stop_when_the_supervisor_dies(self, tmp_path: Path) -> None:
        """Workers whose supervisor was killed notice it, drain and exit on their own."""
        port = free_port()
        async with relay_in_vhost(tmp_path, metrics={"port": port},
                                  logging={"level": "info"}) as relay:
            process = relay.spawn()
            try:
                report = await status_when(port, all_up, wait=60)
                pids = [w["pid"] for w in report["workers"]]
                process.kill()
                process.wait(timeout=10)

                async def workers_gone() -> bool | None:
                    return None if any(alive(pid) for pid in pids) else True
                await until(workers_gone, wait=30)
            finally:
                kill_group(process)
        lines = [orjson.loads(line) for line in (tmp_path / "relayd.log").read_text().splitlines()]
        assert sorted(line["worker"] for line in lines if line["event"] == "drained") == [
            "inbound-0", "outbound-0"]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


USER = "user-7q2w9x@example.org"


async def conversation(relay: Relay, tag: str) -> list[str]:
    """Both directions, echoes, a close, a rejected reply and a bad envelope; return every
    secret that must stay out of logs and metrics."""
    phone = await relay.add_device(USER, f"dev-{tag}-phone")
    laptop = await relay.add_device(USER, f"dev-{tag}-laptop")
    texts = [f"hello-{secrets.token_hex(6)}" for _ in range(4)]
    await relay.send(phone, "acme", "start", {"intent": "billing", "text": texts[0]})
    [start] = await relay.events("acme", 1)
    await relay.send(laptop, "acme", "message", {"text": texts[1]})
    await relay.events("acme", 1)
    await relay.reply("acme", start["conversation"], "message", {"text": texts[2]})
    for device in (phone, laptop):
        await relay.received(device, 2)
    ghost = DeviceKeys.generate(f"dev-{tag}-ghost")
    await relay.publish_up(ghost.seal(relay.public, ghost.payload("acme", "start")))
    await relay.publish_up(os.urandom(200))
    await relay.dead(2)
    await relay.send(phone, "acme", "close")
    await relay.events("acme", 1)
    await relay.received(laptop, 1)
    await relay.reply("acme", start["conversation"], "message", {"text": texts[3]})
    [error] = await relay.events("acme", 1)
    assert error["code"] == "conversation_closed"
    return [USER, start["conversation"], *texts, *key_material(relay, phone, laptop, ghost)]


def key_material(relay: Relay, *devices: DeviceKeys) -> list[str]:
    """Every private and public key of the relay and the devices, as text would show it."""
    raw = [relay.keyring.current.public_raw, relay.keyring.opaque_secret,
           relay.keyring.signing.private_bytes_raw(),
           relay.keyring.signing.public_key().public_bytes_raw()]
    for device in devices:
        raw += [device.enc_private_raw, device.enc_public, device.sign_public,
                device.sign_private.private_bytes_raw()]
    for path in relay.settings.keys.dir.iterdir():
        data = orjson.loads(path.read_bytes())
        raw.append(b64d(data.get("private_key") or data["secret"]))
    shown = []
    for key in raw:
        shown += [b64e(key), base64.b64encode(key).decode()[:40], key.hex()[:40]]
    return shown + [device.device for device in devices]


def assert_reveals_nothing(text: str, secrets_: list[str]) -> None:
    leaked = [secret for secret in secrets_ if secret in text]
    assert leaked == []


class TestLogs:
    async def test_worker_processes_log_no_personal_data(self, tmp_path: Path) -> None:
        """At debug level, the real processes log each message handled with stage, outcome,
        reason and latency, and no line holds a user id, device id, text, key or
        conversation id."""
        async with relay_in_vhost(tmp_path, logging={"level": "debug"}) as relay:
            await relay.add_business("acme")
            process = relay.spawn()
            try:
                hidden = await conversation(relay, "proc")
                assert stop_process(process) == ExitCode.OK
            finally:
                kill_group(process)
            text = (tmp_path / "relayd.log").read_text()
        lines = [orjson.loads(line) for line in text.splitlines()]  # every line is JSON
        handled = [line for line in lines if line["event"] == "handled"]
        assert len(handled) == 7
        assert all({"stage", "outcome", "reason", "latency_ms"} <= set(h) for h in handled)
        assert {h["reason"] for h in handled} >= {"unknown_device", "decrypt_failed"}
        assert_reveals_nothing(text, hidden)

    async def test_in_process_workers_log_no_personal_data(self, relay: Relay) -> None:
        """The same conversation through workers in this process, logging at debug."""
        stream = io.StringIO()
        log.setup(Logging(level="debug", format="json"), stream=stream)
        try:
            await relay.add_business("acme")
            await relay.start()
            hidden = await conversation(relay, "inproc")
            await relay.halt()
        finally:
            log.reset()
        handled = [line for line in stream.getvalue().splitlines() if '"handled"' in line]
        assert len(handled) == 7
        assert_reveals_nothing(stream.getvalue(), hidden)


class TestMetrics:
    async def test_counts_latency_and_status_without_personal_data(self, tmp_path: Path
                                                                    ) -> None:
        """/metrics counts each stage's outcomes and rejections by reason, times confirms
        and end-to-end latency, holds no id in any label, and `relayd status` sums it up."""
        port = free_port()
        async with relay_in_vhost(tmp_path, metrics={"port": port}) as relay:
            await relay.add_business("acme")
            process = relay.spawn()
            try:
                await status_when(port, all_up, wait=60)
                hidden = await conversation(relay, "metrics")

                async def settled() -> dict[Any, float] | None:
                    samples = scrape(port)
                    done = sum(value for (name, _), value in samples.items()
                               if name == "relayd_messages_total")
                    return samples if done == 7 else None
                samples = await until(settled)
                text = http(port, "/metrics")[1].decode()
                summary = relayd("status", "--config", str(relay.config_path))
                as_json = relayd("status", "--json", "--config", str(relay.config_path))
                assert stop_process(process) == ExitCode.OK
            finally:
                kill_group(process)
            stopped = relayd("status", "--config", str(relay.config_path))

        def count(stage: str, outcome: str) -> float:
            return sample(samples, "relayd_messages_total", stage=stage, outcome=outcome)
        assert (count("inbound", "delivered"), count("inbound", "dead_lettered")) == (3, 2)
        assert (count("outbound", "delivered"), count("outbound", "rejected")) == (1, 1)
        rejections = {dict(labels)["reason"]: value for (name, labels), value in samples.items()
                      if name == "relayd_rejections_total"}
        assert rejections == {"unknown_device": 1, "decrypt_failed": 1,
                              "conversation_closed": 1}
        confirms = {target: sample(samples, "relayd_publish_confirm_seconds_count",
                                   target=target) for target in ("business", "device", "dead")}
        assert confirms == {"business": 4, "device": 5, "dead": 2}
        assert sample(samples, "relayd_end_to_end_seconds_count", stage="inbound") == 5
        assert sample(samples, "relayd_end_to_end_seconds_count", stage="outbound") == 2
        assert sample(samples, "relayd_in_flight_messages", stage="inbound") == 0
        assert sample(samples, "relayd_ready") == 1
        labels = {label for name, labelset in samples for label, _ in labelset
                  if name.startswith("relayd_")}
        assert labels <= {"stage", "outcome", "reason", "target", "role", "queue", "le",
                          "version", "python"}
        assert sample(samples, "relayd_build_info", version=__version__,
                      python=platform.python_version()) == 1
        assert sample(samples, "process_resident_memory_bytes") > 0
        assert any(name == "python_info" for name, _ in samples)
        # counters that exist from the start, at 0: nothing retried, nothing reconnected
        assert ("relayd_messages_total", frozenset(
            {("stage", "inbound"), ("outcome", "retry")})) in samples
        assert count("inbound", "retry") == 0
        assert sample(samples, "relayd_reconnects_total", stage="outbound") == 0
        assert ("relayd_reconnects_total", frozenset({("stage", "outbound")})) in samples
        assert_reveals_nothing(text, hidden)

        assert summary.returncode == ExitCode.OK, summary.stderr
        assert f"relayd {__version__}: ready" in summary.stdout
        assert "installed:" not in summary.stdout
        assert "inbound-0" in summary.stdout
        assert "outbound-0" in summary.stdout
        assert "inbound 0 (1 consumers)" in summary.stdout
        assert "keys: current test-1 (X25519)" in summary.stdout
        report = orjson.loads(as_json.stdout)
        assert [(w["name"], w["state"]) for w in report["supervisor"]["workers"]] == [
            ("inbound-0", "consuming"), ("outbound-0", "consuming"), ("retention-0", "running")]
        assert report["queues"]["inbound"] == {"messages": 0, "consumers": 1}
        assert stopped.returncode == ExitCode.FAILURE
        assert f"relayd {__version__}: not running" in stopped.stdout
        assert "keys: current test-1" in stopped.stdout


class TestReload:
    async def test_sighup_rotates_keys_and_log_level(self, tmp_path: Path) -> None:
        """After a new kid is generated and SIGHUP sent, devices sealing to the new kid and
        to the old one are both accepted, nothing in flight is lost, and the new log level
        applies."""
        port = free_port()
        async with relay_in_vhost(tmp_path, workers={"inbound": 2},
                                  metrics={"port": port}) as relay:
            await relay.add_business("acme")
            phone = await relay.add_device("alice", "phone")
            process = relay.spawn()
            try:
                await status_when(port, all_up, wait=60)
                ids = {await relay.send(phone, "acme", "start")}
                for n in range(200):
                    ids.add(await relay.send(phone, "acme", "message", {"text": str(n)}))
                keys.generate(relay.settings.keys.dir, "test-2")
                relay.config_path.write_text(relay.config_path.read_text().replace(
                    "level: warning", "level: debug"))  # a delivered message: at debug
                process.send_signal(signal.SIGHUP)
                await status_when(port, lambda r: r["keys"]["current"] == "test-2" and all(
                    w["kid"] == "test-2" for w in r["workers"]))
                new = RelayPublic.from_json(keys.load(relay.settings.keys.dir,
                                                      timedelta(days=1)).public_info())
                assert new.kid == "test-2"
                relay.public, old = new, relay.public
                ids.add(await relay.send(phone, "acme", "message", {"text": "to new"}))
                relay.public = old
                ids.add(await relay.send(phone, "acme", "message", {"text": "to old"}))
                seen, duplicates = await collect(relay, ids)
                assert (seen, duplicates) == (ids, 0)
                await relay.assert_empty(relay.settings.topology.dead_queue)

                async def handled_logged() -> bool | None:
                    return True if '"handled"' in (tmp_path / "relayd.log").read_text() else None
                await until(handled_logged)
                assert stop_process(process) == ExitCode.OK
            finally:
                kill_group(process)
            lines = [orjson.loads(line)
                     for line in (tmp_path / "relayd.log").read_text().splitlines()]
            reloaded = [line for line in lines if line["event"] == "reloaded"]
            assert sorted(line["worker"] for line in reloaded) == [
                "inbound-0", "inbound-1", "outbound-0", "retention-0"]
            assert all(line["kids"] == ["test-1", "test-2"] for line in reloaded)

    async def test_bad_keys_change_nothing(self, tmp_path: Path) -> None:
        """A reload that finds a broken key file is refused, naming the file: the old keys
        stay in use."""
        port = free_port()
        async with relay_in_vhost(tmp_path, metrics={"port": port}) as relay:
            await relay.add_business("acme")
            phone = await relay.add_device("alice", "phone")
            process = relay.spawn()
            try:
                await status_when(port, all_up, wait=60)
                (relay.settings.keys.dir / "hpke-broken.json").write_text("{}")
                (relay.settings.keys.dir / "hpke-broken.json").chmod(0o600)
                process.send_signal(signal.SIGHUP)

                async def refused() -> bool | None:
                    return True if "reload_failed" in (
                        tmp_path / "relayd.log").read_text() else None
                await until(refused)
                failures = [orjson.loads(line) for line in
                            (tmp_path / "relayd.log").read_text().splitlines()
                            if '"reload_failed"' in line]
                assert all(any("hpke-broken.json" in key for key in failure["config_key"])
                           for failure in failures)
                message_id = await relay.send(phone, "acme", "start")
                [event] = await relay.events("acme", 1)
                assert event["id"] == message_id
                assert (await status_when(port, lambda r: True))["keys"]["current"] == "test-1"
                assert stop_process(process) == ExitCode.OK
            finally:
                kill_group(process)


def mdwe_supported() -> bool:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return bool(prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0)


MDWE_RUN = ("-c", "import ctypes, sys\n"
            f"assert ctypes.CDLL(None).prctl({PR_SET_MDWE}, 1, 0, 0, 0) == 0\n"
            "from relayd.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")


class TestMemoryDenyWriteExecute:
    @pytest.mark.skipif(not mdwe_supported(), reason="the kernel has no PR_SET_MDWE (< 6.3)")
    async def test_relays_under_mdwe(self, relay: Relay, tmp_path: Path) -> None:
        """Under the kernel's memory-deny-write-execute (what MemoryDenyWriteExecute=yes
        asks for), inherited by every worker, relayd's dependencies still relay both ways."""
        await relay.add_business("acme")
        phone = await relay.add_device("alice", "phone")
        process = relay.spawn(command=MDWE_RUN)
        try:
            await relay.send(phone, "acme", "start")
            [start] = await relay.events("acme", 1, wait=60)
            reply_id = await relay.reply("acme", start["conversation"], "message",
                                         {"text": "hi"})
            [delivered] = await relay.received(phone, 1)
            assert delivered["id"] == reply_id
            assert stop_process(process) == ExitCode.OK
        finally:
            kill_group(process)
        assert "Traceback" not in (tmp_path / "relayd.log").read_text()
