from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.harness import Relay, relay_in_vhost


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    """A relay with its own vhost, keys and SQLite store; workers not started."""
    async with relay_in_vhost(tmp_path) as r:
        yield r
