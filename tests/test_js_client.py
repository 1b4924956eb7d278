"""The JavaScript device SDK (clients/js): its own tests, run by Node's test runner.

They prove the SDK against relayd itself (interop both ways, through
tests/support/relayd_peer.py with this interpreter), against the contract's test vectors,
under hostile input, and against a WebSocket edge that speaks the edge wire protocol.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parent.parent / "clients" / "js"


def _why_not() -> str | None:
    """Why the SDK's tests cannot run on this machine, or None when they can."""
    node = shutil.which("node")
    if node is None:
        return "node is not installed (scripts/setup installs Debian's nodejs)"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major = re.match(r"v(\d+)\.", version.stdout)
    if major is None or int(major.group(1)) < 20:
        return f"the SDK needs Node.js 20 or later, this is {version.stdout.strip()}"
    if not (JS / "node_modules" / "@hpke" / "core").is_dir():
        return "the npm packages are not installed: run scripts/setup (npm ci in clients/js)"
    return None


@pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))
def test_js_sdk_tests_pass() -> None:
    """node --test clients/js passes, with none of its tests skipped or failed."""
    run = subprocess.run(
        ["node", "--test", "--test-timeout=120000", "test/"], cwd=JS, capture_output=True,
        text=True, timeout=600, check=False,
        env={**os.environ, "RELAYD_PYTHON": sys.executable},
    )
    summary = dict(re.findall(r"^# (pass|fail|cancelled|skipped) (\d+)$", run.stdout, re.M))
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert int(summary.get("pass", "0")) > 0, run.stdout[-2000:]
    assert (summary["fail"], summary["cancelled"], summary["skipped"]) == ("0", "0", "0"), summary
