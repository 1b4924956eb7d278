"""The fault suite's dedicated RabbitMQ node, and the table it prints at the end of the run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.ledger import NOTES, ROWS, table
from tests.support.broker import TestBroker


@pytest.fixture(scope="package")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestBroker]:
    """One node for the whole suite; its statistics refresh every second (messages_dlx)."""
    broker = TestBroker(tmp_path_factory.mktemp("fault-node"),
                        extra_conf="collect_statistics_interval = 1000")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the checker's table, so that CI's log shows it."""
    if ROWS:
        terminalreporter.write_sep("=", "relayd fault suite: per fault")
        for line in [*table(ROWS), "", *NOTES]:
            terminalreporter.write_line(line)
