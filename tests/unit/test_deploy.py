"""deploy/: the systemd unit passes systemd-analyze, and the dashboard and alert rules
only use metrics relayd exports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from relayd import config, consume, metrics

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "relayd.service"
VAULT_UNIT = ROOT / "deploy" / "relayd-vault.service"
OPERATIONS = ROOT / "docs" / "operations.md"
METRIC = re.compile(r"\brelayd_[a-z_]+")


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every Key=value of a unit file; a key may appear more than once."""
    settings: dict[str, list[str]] = defaultdict(list)
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings[key.strip()].append(value.strip())
    return settings


@pytest.fixture(scope="module")
def installable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unit as an operator installs it, with ExecStart pointing at this venv's relayd
    (systemd-analyze checks that the binary exists)."""
    relayd = Path(sys.executable).parent / "relayd"
    assert relayd.is_file(), "pip install -e . puts relayd next to the venv's python"
    unit = tmp_path_factory.mktemp("unit") / "relayd.service"
    unit.write_text(UNIT.read_text().replace("/opt/relayd/bin/relayd", str(relayd)))
    return unit


def exported_samples() -> set[str]:
    """Every sample name relayd's /metrics can show."""
    names = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                suffixes = {"counter": ["_total"], "gauge": [""],
                            "histogram": ["_bucket", "_sum", "_count"]}[family.type]
                names |= {family.name + s for s in suffixes}
    collector = metrics.SupervisorCollector()
    collector.configured = {"inbound": 1}
    collector.queues = {"dead": (0, 0)}
    names |= {s.name for family in collector.collect() for s in family.samples}
    return names


class TestSystemdUnit:
    def test_verify_accepts_it(self, installable: Path) -> None:
        """systemd-analyze verify finds nothing to say about the unit."""
        result = subprocess.run(["systemd-analyze", "verify", str(installable)],
                                capture_output=True, text=True, timeout=60)
        complaints = [line for line in result.stderr.splitlines() if "relayd" in line]
        assert (result.returncode, complaints) == (0, [])

    def test_security_is_ok_or_better_and_documented(self, installable: Path) -> None:
        """The offline security review rates the unit OK or better, and the docs say so."""
        assert "--offline" in subprocess.run(["systemd-analyze", "security", "--help"],
                                             capture_output=True, text=True).stdout
        result = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                                 str(installable)], capture_output=True, text=True, timeout=60)
        found = re.search(r"Overall exposure level for relayd\.service: ([\d.]+) (\w+)",
                          result.stdout)
        assert found is not None, result.stdout + result.stderr
        score, level = found.groups()
        assert level in ("OK", "SAFE", "PERFECT")
        assert f"{score} {level}" in OPERATIONS.read_text()

    def test_what_the_service_needs(self) -> None:
        """Notify type with watchdog, restart on failure, config in /etc/relayd, keys as
        credentials, a non-root user and the hardening the issue names."""
        unit = unit_settings(UNIT.read_text())
        assert unit["Type"] == ["notify"]
        assert unit["WatchdogSec"]
        assert unit["Restart"] == ["on-failure"]
        assert "--config /etc/relayd/relayd.yaml" in unit["ExecStart"][0]
        assert unit["LoadCredential"] == ["keys:/etc/relayd/keys"]
        assert unit["User"] == ["relayd"]
        assert unit["StateDirectory"] == ["relayd"]
        assert unit["KillMode"] == ["mixed"]  # relayd stops its own workers
        assert unit["SyslogLevelPrefix"] == ["yes"]  # levels reach journald (relayd.log)
        for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes",
                           "PrivateTmp": "yes", "NoNewPrivileges": "yes",
                           "CapabilityBoundingSet": "", "MemoryDenyWriteExecute": "yes",
                           "UMask": "0077"}.items():
            assert unit[key] == [value], key
        assert "@system-service" in unit["SystemCallFilter"]
        assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]

    def test_the_vault_unit_is_hardened_alike(self, tmp_path: Path) -> None:
        """deploy/relayd-vault.service runs `relayd vault` on the same config, as the same
        user with the same state directory and hardening, and systemd-analyze verify
        accepts it."""
        relay, vault = unit_settings(UNIT.read_text()), unit_settings(VAULT_UNIT.read_text())
        assert vault["ExecStart"] == [
            "/opt/relayd/bin/relayd vault --config /etc/relayd/relayd.yaml"]
        same = ["User", "Group", "StateDirectory", "UMask", "ProtectSystem",
                "NoNewPrivileges", "CapabilityBoundingSet", "SystemCallFilter",
                "MemoryDenyWriteExecute", "RestrictAddressFamilies", "IPAddressDeny"]
        assert {k: vault[k] for k in same} == {k: relay[k] for k in same}
        assert "LoadCredential" not in vault  # it reads no relay key
        relayd = Path(sys.executable).parent / "relayd"
        unit = tmp_path / "relayd-vault.service"
        unit.write_text(VAULT_UNIT.read_text().replace("/opt/relayd/bin/relayd", str(relayd)))
        result = subprocess.run(["systemd-analyze", "verify", str(unit)],
                                capture_output=True, text=True, timeout=60)
        assert (result.returncode, [line for line in result.stderr.splitlines()
                                    if "relayd" in line]) == (0, [])


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ROOT / "deploy/grafana/relayd.json").read_text())
    return data


@pytest.fixture(scope="module")
def rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load((ROOT / "deploy/prometheus/relayd-alerts.yml").read_text())
    return {rule["alert"]: rule for group in groups["groups"] for rule in group["rules"]}


class TestDashboard:
    def test_uses_only_exported_metrics(self, dashboard: dict[str, Any]) -> None:
        """Every relayd metric a panel queries is one that relayd exports."""
        used = {name for panel in dashboard["panels"] for target in panel.get("targets", [])
                for name in METRIC.findall(target["expr"])}
        assert len(used) >= 8
        assert used <= exported_samples()

    def test_has_the_panels_operators_need(self, dashboard: dict[str, Any]) -> None:
        """Throughput, rejections, latency percentiles, dead-letter depth and restarts."""
        exprs = {panel["title"]: " ".join(t["expr"] for t in panel.get("targets", []))
                 for panel in dashboard["panels"]}
        assert "relayd_messages_total" in exprs["Throughput per stage and outcome"]
        assert "relayd_rejections_total" in exprs["Rejections by reason"]
        for title in ("End-to-end latency", "Publish-to-confirm latency"):
            assert exprs[title].count("histogram_quantile") == 3
        assert 'queue="dead"' in exprs["Dead-letter depth"]
        assert "relayd_worker_restarts_total" in exprs["Worker restarts"]

    def test_has_the_brokers_panels(self, dashboard: dict[str, Any]) -> None:
        """Beside relayd's, the broker's alarms, memory and disk against their limits, and
        its message rates (tests/integration/test_business_tls.py checks the names against
        a node running the shipped config)."""
        exprs = " ".join(t["expr"] for panel in dashboard["panels"]
                         for t in panel.get("targets", []))
        for name in ("rabbitmq_alarms_memory_used_watermark",
                     "rabbitmq_alarms_free_disk_space_watermark",
                     "rabbitmq_resident_memory_limit_bytes",
                     "rabbitmq_disk_space_available_limit_bytes",
                     "rabbitmq_global_messages_confirmed_total"):
            assert name in exprs
        broker = [p for p in dashboard["panels"] if "$broker" in json.dumps(p)]
        assert len(broker) >= 5


class TestAlertRules:
    def test_rules_are_complete(self, rules: dict[str, dict[str, Any]]) -> None:
        """Each rule has an expression on exported metrics, a severity and a summary."""
        exported = exported_samples()
        for rule in rules.values():
            assert set(METRIC.findall(rule["expr"])) <= exported, rule["alert"]
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"]

    def test_cover_what_the_issue_names(self, rules: dict[str, dict[str, Any]]) -> None:
        """Dead-letter growth, consumer loss and confirm latency each have a rule,
        and the docs show the same rules."""
        assert 'queue="dead"' in rules["RelaydDeadLettersGrowing"]["expr"]
        assert "relayd_workers_consuming" in rules["RelaydConsumerLost"]["expr"]
        assert "relayd_publish_confirm_seconds" in rules["RelaydConfirmLatencyHigh"]["expr"]
        docs = OPERATIONS.read_text()
        assert all(name in docs for name in rules)


class TestBrokerConfig:
    def test_relayd_default_channel_max_is_the_shipped_brokers(self) -> None:
        """amqp.channel_max defaults to deploy/rabbitmq's channel_max, so check-config
        refuses shards that the shipped broker could not give one process in a failover."""
        conf = (ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf").read_text()
        [value] = re.findall(r"^channel_max\s*=\s*(\d+)", conf, re.MULTILINE)
        assert int(value) == config.Amqp(url="amqp://x/").channel_max

    def test_the_broker_lets_a_held_message_wait_as_long_as_relayd_holds_it(self) -> None:
        """A message held in place (relayd.consume.hold_limit) stays unacked that long:
        the shipped consumer_timeout must outlast it, or the broker closes the channel and
        the quorum delivery limit dead-letters the message after a few closes."""
        conf = (ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf").read_text()
        [value] = re.findall(r"^consumer_timeout\s*=\s*(\d+)", conf, re.MULTILINE)
        settings = config.parse({"amqp": {"url": "amqp://x/"}, "store": {"url": "sqlite:///x"},
                                 "keys": {"dir": "/x"}})
        assert int(value) / 1000 > consume.hold_limit(settings)
        assert int(value) < 2**32  # an Erlang timer's bound
