"""What the store's pseudonymous layer (relayd.store.pseudonym) adds to a read: household()
of a user with three devices, through the layer and from the backend alone, on SQLite or
the store URL given. Run: .venv/bin/python scripts/bench_pseudonyms.py [STORE_URL]"""

from __future__ import annotations

import asyncio
import functools
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

from relayd.crypto import Kem
from relayd.store import Device, open_store
from relayd.store.pseudonym import Pseudonymous

CALLS, ROUNDS = 2000, 5


async def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else f"sqlite:///{tempfile.mkdtemp()}/relayd.db"
    store = await open_store(url, secret=b"o" * 32)
    assert isinstance(store, Pseudonymous)
    for i in range(3):
        await store.add_device(Device(f"d{i}", "u", Kem.X25519, b"e" * 32, b"s" * 32))
    calls: dict[str, Callable[[], Awaitable[list[Device]]]] = {
        "through the layer": lambda: store.household("d0"),
        "backend alone": functools.partial(store.backend.household,
                                           store.device_pseudonym("d0"))}
    for name, call in calls.items():
        times = []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            for _ in range(CALLS):
                await call()
            times.append((time.perf_counter() - start) / CALLS * 1e6)
        print(f"{name}: household() {min(times):.0f} us (best of {ROUNDS} x {CALLS})")
    await store.close()


asyncio.run(main())
