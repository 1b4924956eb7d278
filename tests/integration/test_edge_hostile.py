"""Hostile frames at the WebSocket door: whatever one connection sends, it gets a typed
close (or its answers), and the edge goes on serving everyone else.

In the spirit of the websockets library's own Autobahn runs: hypothesis draws binary and
text frames, broken JSON, near-miss frames and valid frames in hostile order, before and
after login; after each example a witness device, logged in all along, must still be
answered, and at the end must still get its messages.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from relayd.crypto import b64e
from tests.integration.edge_harness import closed, frame, put, put_down, running
from tests.integration.harness import Relay

TYPES = ["login", "send", "received", "ping", "ready", "challenge", "ack", "deliver", ""]
FIELDS = ["type", "device", "sig", "ref", "kid", "sealed", "tag", "v", "code"]
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-2**64, max_value=2**64)
           | st.floats(allow_nan=False) | st.text(max_size=12))
CLOSES = {1007, 1009, 4400, 4401}

near_miss = st.builds(
    lambda kind, fields: json.dumps({"type": kind, **fields}),
    st.sampled_from(TYPES), st.dictionaries(st.sampled_from(FIELDS), SCALARS, max_size=5))
valid = st.one_of(
    st.builds(lambda r: orjson.dumps({"type": "ping", "ref": r}).decode(),
              st.integers(0, 2**53 - 1)),
    st.builds(lambda t: orjson.dumps({"type": "received", "tag": t}).decode(),
              st.integers(0, 5)),
    st.builds(lambda r, s: orjson.dumps({"type": "send", "ref": r, "kid": "test-1",
                                         "sealed": b64e(s)}).decode(),
              st.integers(0, 10), st.binary(max_size=64)),
    st.builds(lambda s: orjson.dumps({"type": "send", "ref": 1, "kid": "k",
                                      "sealed": s}).decode(), st.text(max_size=20)),
)
hostile = st.one_of(st.binary(max_size=256), st.text(max_size=256), near_miss, valid,
                    st.just('{"type":"ping","ref":1,"ref":2}'),
                    st.just("[" * 5000), st.just("\ud800".encode("utf-8", "surrogatepass")))


@pytest.fixture
async def door(relay: Relay) -> Any:
    async with running(relay, connection_burst=1000, connection_rate=1000) as edge:
        witness = await relay.add_device("alice", "witness")
        mallory = await relay.add_device("mallory", "mallory")
        watching = await edge.login(witness)
        yield edge, witness, mallory, watching
        await watching.close()


class TestHostileFrames:
    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(logged_in=st.booleans(), messages=st.lists(hostile, min_size=1, max_size=6))
    async def test_the_edge_stays_up_for_everyone_else(
            self, relay: Relay, door: Any, logged_in: bool,
            messages: list[str | bytes]) -> None:
        """Each hostile connection ends with a typed close or keeps being answered; the
        witness is answered after every example."""
        edge, _, mallory, watching = door
        ws = await (edge.login(mallory) if logged_in else edge.raw())
        if not logged_in:
            assert (await frame(ws))["type"] == "challenge"
        try:
            for message in messages:
                await ws.send(message)
            await put(ws, {"type": "ping", "ref": 424242})
            while (answer := await frame(ws))["type"] != "pong":
                assert answer["type"] in ("ack", "nack", "pong", "deliver", "refused")
            assert logged_in
        except ConnectionClosed:
            assert await closed(ws) in CLOSES
        finally:
            await ws.close()
        await put(watching, {"type": "ping", "ref": 7})
        assert await frame(watching) == {"type": "pong", "ref": 7}

    async def test_after_the_storm_the_witness_still_gets_its_messages(
            self, relay: Relay, door: Any) -> None:
        """A burst of garbage connections, then the witness's queue still flows."""
        edge, witness, _, watching = door
        for garbage in (b"\x00" * 10, "{", '{"type":"login"}', "x" * 1000):
            ws = await edge.raw()
            await frame(ws)
            await ws.send(garbage)
            assert await closed(ws) in CLOSES
        await put_down(relay, witness, [b"still here"])
        assert (await frame(watching))["sealed"] == b64e(b"still here")
