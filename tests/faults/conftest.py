"""The fault suite's dedicated RabbitMQ node, and the table it prints at the end of the run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.ledger import NOTES, ROWS, table
from tests.support.broker import TestBroker
from tests.support.cluster import Cluster


@pytest.fixture(scope="package")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestBroker]:
    """One node for the whole suite; a dead-letter that found no queue is tried again after
    2 s instead of 3 minutes."""
    broker = TestBroker(
        tmp_path_factory.mktemp("fault-node"),
        advanced_config="[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 2000}]}].")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 3-node cluster for the suite's cluster tests (tests/support/cluster.py): started
    once, since forming it takes about 25 s here; removed with everything it made."""
    nodes = Cluster(tmp_path_factory.mktemp("cluster"),
                    advanced_config="[{rabbit, [{dead_letter_worker_publisher_confirm_timeout,"
                                    " 2000}]}].")
    nodes.start()
    try:
        yield nodes
    finally:
        nodes.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the checker's table, so that CI's log shows it."""
    if ROWS or NOTES:
        terminalreporter.write_sep("=", "relayd fault suite: per fault")
        for line in [*(table(ROWS) if ROWS else []), "", *NOTES]:
            terminalreporter.write_line(line)
