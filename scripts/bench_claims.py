"""What a user's message costs on PostgreSQL, the store alone: the server's CPU and this
process's (asyncpg and relayd.store) per Store.accept_up, with N claims in flight.

Usage: .venv/bin/python scripts/bench_claims.py [--claims N] [--in-flight N]
           [--postgres SERVER_URL]

Each claim is a message of its own device (128 devices, one user each, one business), as
the inbound worker makes them with its lanes full. The server's CPU is read from its
processes (and the postmaster's reaped children) before and after, so nothing else
should use that server meanwhile. CPU per claim is what to compare: the machine is
shared and its wall clock noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from collections.abc import Callable

import asyncpg
import psutil
import uvloop

from relayd.crypto import Kem
from relayd.store import Business, Device, UpClaim, open_store

DEVICES = 128


def server_cpu() -> float:
    """CPU seconds of every PostgreSQL process, and of the children they reaped."""
    total = 0.0
    for process in psutil.process_iter(["name"]):
        if process.info["name"] not in ("postgres", "postmaster"):
            continue
        try:
            t = process.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


async def main(claims: int, in_flight: int, server: str) -> None:
    name = f"relayd_claims_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(f"{server}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        store = await open_store(f"{server}/{name}", secret=b"o" * 32)
        try:
            await store.add_business(Business("acme", "acme-user"))
            households = []
            for i in range(DEVICES):
                await store.add_device(Device(f"dev-{i}", f"user-{i}", Kem.X25519,
                                              os.urandom(32), os.urandom(32)))
                households.append(tuple(await store.household(f"dev-{i}")))
            seqs = [0] * DEVICES

            def make_id(i: int) -> Callable[[int], str]:
                return lambda epoch: f"c{i}-{epoch}".ljust(32, "x")

            async def lane(j: int, count: int) -> None:
                for n in range(count):
                    i = (j + n * in_flight) % DEVICES
                    seqs[i] += 1
                    outcome = await store.accept_up(UpClaim(
                        households[i], f"dev-{i}", seqs[i], 64, "acme",
                        "start" if seqs[i] == 1 else "message", False,
                        int(time.time() * 1000), False, make_id(i)))
                    assert outcome.status == "accepted", outcome

            await asyncio.gather(*(lane(j, DEVICES // in_flight + 1) for j in range(in_flight)))
            per = claims // in_flight
            before, cpu, started = server_cpu(), time.process_time(), time.monotonic()
            await asyncio.gather(*(lane(j, per) for j in range(in_flight)))
            elapsed = time.monotonic() - started
            done = per * in_flight
            print(f"{done} claims, {in_flight} in flight: {done / elapsed:.0f}/s, server"
                  f" {(server_cpu() - before) / done * 1e6:.0f} µs, this process"
                  f" {(time.process_time() - cpu) / done * 1e6:.0f} µs CPU per claim;"
                  f" load average {os.getloadavg()[0]:.1f}")
        finally:
            await store.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=int, default=8000)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    uvloop.run(main(args.claims, args.in_flight, args.postgres.rstrip("/")))
