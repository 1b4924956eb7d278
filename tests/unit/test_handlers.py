"""Each handler through its one interface, prepare(delivery) -> (lane, work), without a
broker: fake deliveries, a recording sink and a SQLite store in the test's directory."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from relayd import config, envelope, shard
from relayd.client import DeviceKeys, reply
from relayd.crypto import Kem, raw_public
from relayd.deliver import fan_out, now_ms
from relayd.errors import EnvelopeError, PermanentError, TransientError
from relayd.gdpr import Erasure
from relayd.inbound import Inbound
from relayd.keys import KeyRing, RelayKey
from relayd.outbound import Outbound
from relayd.route import inbound_router, outbound_router
from relayd.store import Business, Device, Store, open_store
from tests.unit.fakes import FakeDelivery, RecordingSink
from tests.unit.helpers import RELAYS

RELAY = RELAYS[Kem.X25519]
KEYRING = KeyRing({RELAY.kid: RelayKey(RELAY.kid, RELAY.kem, datetime.now(UTC), RELAY.private,
                                       raw_public(RELAY.kem, RELAY.private_raw))},
                  RelayKey(RELAY.kid, RELAY.kem, datetime.now(UTC), RELAY.private,
                           raw_public(RELAY.kem, RELAY.private_raw)), RELAY.signing, b"o" * 32)


def settings(tmp_path: Path, shards: int = 1) -> config.Settings:
    return config.parse({"amqp": {"url": "amqp://relayd@localhost"},
                         "store": {"url": f"sqlite:///{tmp_path}/relayd.db"},
                         "keys": {"dir": str(tmp_path / "keys")},
                         "gdpr": {"identity_user": "identity"},
                         "topology": {"shards": shards}}, environ={})


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    backend = await open_store(f"sqlite:///{tmp_path}/relayd.db", secret=KEYRING.opaque_secret)
    await backend.add_business(Business("acme", "guest"))
    yield backend
    await backend.close()


async def add(store: Store, user: str, name: str) -> DeviceKeys:
    device = DeviceKeys.generate(name)
    await store.add_device(Device(name, user, Kem.X25519, device.enc_public, device.sign_public))
    return device


def up(device: DeviceKeys, kind: str, **delivery: object) -> FakeDelivery:
    """A device's message as the inbound queue delivers it."""
    body = device.seal(RELAY.public, device.payload("acme", kind, {"text": "hi"}
                                                    if kind in ("start", "message") else {}))
    return FakeDelivery(body=body, headers={envelope.KID_HEADER: RELAY.kid},
                        **delivery)  # type: ignore[arg-type]


class TestInbound:
    async def test_a_start_reaches_the_business_and_echoes(self, tmp_path: Path,
                                                           store: Store) -> None:
        """A device's start is in the lane of its conversation (the device and the
        business); its work publishes the business event
        and an echo to the user's other device, and opens the conversation."""
        phone, _ = await add(store, "alice", "phone"), await add(store, "alice", "tablet")
        sink = RecordingSink()
        inbound = Inbound(settings(tmp_path), store, lambda: KEYRING, sink)
        lane, work = inbound.prepare(up(phone, "start"))
        assert lane == "d:phone\0acme"
        assert await work() == "start"
        [(_, business, event, _, kind)] = sink.of("business")
        assert (business, kind, orjson.loads(event)["type"]) == ("acme", "start", "start")
        assert [d[1] for d in sink.of("device")] == ["tablet"]
        conversation = await store.conversation_of("alice", "acme")
        assert conversation is not None
        assert conversation.state == "open"

    async def test_an_envelope_for_no_key_is_refused_in_prepare(self, tmp_path: Path,
                                                                store: Store) -> None:
        """prepare refuses an envelope under a kid the relay does not hold."""
        phone = await add(store, "alice", "phone")
        inbound = Inbound(settings(tmp_path), store, lambda: KEYRING, RecordingSink())
        delivery = up(phone, "start")
        delivery.headers = {envelope.KID_HEADER: "someone-else"}
        with pytest.raises(EnvelopeError) as caught:
            inbound.prepare(delivery)
        assert caught.value.reason == "bad_kid"

    async def test_a_redelivery_is_a_retry_a_copy_is_a_replay(self, tmp_path: Path,
                                                              store: Store) -> None:
        """The same envelope again is accepted when the broker says it redelivers it, and
        refused as replayed when it does not."""
        phone = await add(store, "alice", "phone")
        inbound = Inbound(settings(tmp_path), store, lambda: KEYRING, RecordingSink())
        first = up(phone, "start")
        await inbound.prepare(first)[1]()
        again = FakeDelivery(body=first.body, headers=first.headers, redelivered=True)
        assert await inbound.prepare(again)[1]() == "start"
        copy = FakeDelivery(body=first.body, headers=first.headers)
        with pytest.raises(EnvelopeError) as caught:
            await inbound.prepare(copy)[1]()
        assert caught.value.reason == "replayed"


class TestCachedHouseholds:
    """The inbound worker keeps households in memory; the store's transaction checks them."""

    async def test_a_replaced_key_is_never_used_after_the_change(self, tmp_path: Path,
                                                                  store: Store) -> None:
        """A device re-registered with new keys: a message signed with the old key (cached
        from an earlier message) is refused, one with the new key is accepted."""
        old = await add(store, "alice", "phone")
        inbound = Inbound(settings(tmp_path), store, lambda: KEYRING, RecordingSink())
        assert await inbound.prepare(up(old, "start"))[1]() == "start"
        await store.remove_device("phone")
        new = await add(store, "alice", "phone")
        with pytest.raises(EnvelopeError) as caught:
            await inbound.prepare(up(old, "message"))[1]()
        assert caught.value.reason == "bad_signature"
        later = new.seal(RELAY.public, new.payload("acme", "message", {"text": "hi"}, seq=100))
        assert await inbound.prepare(FakeDelivery(
            body=later, headers={envelope.KID_HEADER: RELAY.kid}))[1]() == "message"

    async def test_a_new_device_of_the_user_gets_the_echo(self, tmp_path: Path,
                                                          store: Store) -> None:
        """A device added to the household after it was cached is echoed to at once."""
        phone = await add(store, "alice", "phone")
        sink = RecordingSink()
        inbound = Inbound(settings(tmp_path), store, lambda: KEYRING, sink)
        await inbound.prepare(up(phone, "start"))[1]()
        await add(store, "alice", "tablet")
        await inbound.prepare(up(phone, "message"))[1]()
        assert [d[1] for d in sink.of("device")] == ["tablet"]


class TestThroughTheEdge:
    """Messages the edge published carry x-relayd-device, the device it logged in, and
    the user_id of relayd's broker user (amqp.url's), which the edge logs in as."""

    @staticmethod
    def via_edge(device: DeviceKeys, logged_in: str, ts: int, seq: int,
                 user_id: str | None = "relayd") -> FakeDelivery:
        body = device.seal(RELAY.public, device.payload("acme", "message", {"text": "hi"},
                                                        seq=seq, ts=ts))
        return FakeDelivery(body=body, user_id=user_id, headers={
            envelope.KID_HEADER: RELAY.kid, envelope.DEVICE_HEADER: logged_in})

    async def test_another_devices_envelope_is_wrong_device(self, tmp_path: Path,
                                                            store: Store) -> None:
        """An envelope sealed by one device, sent up on another's connection, is refused
        in prepare, before any work."""
        phone = await add(store, "alice", "phone")
        inbound = Inbound(settings(tmp_path), store, lambda: KEYRING, RecordingSink())
        with pytest.raises(EnvelopeError) as caught:
            inbound.prepare(self.via_edge(phone, "laptop", now_ms(), 1))
        assert caught.value.reason == "wrong_device"

    async def test_the_edges_messages_are_not_judged_twice(self, tmp_path: Path,
                                                          store: Store) -> None:
        """More than the burst, all signed at one ts: through the edge (which judged each
        on arrival) every one is handled; published without the header, the ts bucket
        refuses the one beyond the burst."""
        phone = await add(store, "alice", "phone")
        await Inbound(settings(tmp_path), store, lambda: KEYRING, RecordingSink()).prepare(
            up(phone, "start"))[1]()
        s = settings(tmp_path)
        burst, ts = s.limits.device_burst, now_ms()
        inbound = Inbound(s, store, lambda: KEYRING, RecordingSink())
        for seq in range(100, 101 + burst):  # burst + 1, as a device resending after nacks
            _, work = inbound.prepare(self.via_edge(phone, "phone", ts, seq))
            assert await work() == "message"
        direct = Inbound(s, store, lambda: KEYRING, RecordingSink())
        for seq in range(200, 200 + burst):
            delivery = self.via_edge(phone, "phone", ts, seq)
            delivery.headers = {envelope.KID_HEADER: RELAY.kid}
            assert await direct.prepare(delivery)[1]() == "message"
        delivery = self.via_edge(phone, "phone", ts, 200 + burst)
        delivery.headers = {envelope.KID_HEADER: RELAY.kid}
        with pytest.raises(PermanentError) as caught:
            await direct.prepare(delivery)[1]()
        assert caught.value.reason == "rate_limited"

    @pytest.mark.parametrize("user_id", ["gateway", None])
    async def test_the_header_from_anyone_else_is_judged(self, tmp_path: Path, store: Store,
                                                         user_id: str | None) -> None:
        """x-relayd-device published by another broker user than relayd's (or with no
        user_id), as anyone who may write relayd.ingress can: the message is judged
        against the rate like any other, and the router does not pass the header on."""
        phone = await add(store, "alice", "phone")
        s = settings(tmp_path)
        await Inbound(s, store, lambda: KEYRING, RecordingSink()).prepare(
            up(phone, "start"))[1]()
        inbound = Inbound(s, store, lambda: KEYRING, RecordingSink())
        burst, ts = s.limits.device_burst, now_ms()
        for seq in range(100, 100 + burst):
            assert await inbound.prepare(self.via_edge(phone, "phone", ts, seq, user_id))[1]()
        with pytest.raises(PermanentError) as caught:
            await inbound.prepare(self.via_edge(phone, "phone", ts, 100 + burst, user_id))[1]()
        assert caught.value.reason == "rate_limited"
        sink = RecordingSink()
        router = inbound_router(settings(tmp_path, shards=4), lambda: KEYRING, sink)  # type: ignore[arg-type]
        await router.prepare(self.via_edge(phone, "phone", ts, 1, user_id))[1]()
        [(_, _, _, headers, _)] = sink.sent
        assert envelope.DEVICE_HEADER not in headers


class TestOutbound:
    async def opened(self, tmp_path: Path, store: Store) -> tuple[Outbound, RecordingSink, str]:
        phone = await add(store, "alice", "phone")
        await Inbound(settings(tmp_path), store, lambda: KEYRING, RecordingSink()).prepare(
            up(phone, "start"))[1]()
        conversation = await store.conversation_of("alice", "acme")
        assert conversation is not None
        sink = RecordingSink()
        return Outbound(settings(tmp_path), store, lambda: KEYRING, sink), sink, conversation.id

    async def test_a_reply_is_sealed_to_each_device(self, tmp_path: Path, store: Store) -> None:
        """A reply is one lane per conversation; its work seals it to the user's device."""
        outbound, sink, conversation = await self.opened(tmp_path, store)
        lane, work = outbound.prepare(FakeDelivery(
            body=reply(conversation, "message", {"text": "yes"}), user_id="guest",
            routing_key="acme"))
        assert lane == "c:" + conversation
        assert await work() == "message"
        assert [d[1] for d in sink.of("device")] == ["phone"]

    async def test_an_invalid_reply_is_answered_with_an_error(self, tmp_path: Path,
                                                              store: Store) -> None:
        """A reply with non-ASCII text where base64 is expected gets an `invalid` error
        event in the business's inbox, and reaches no device."""
        outbound, sink, conversation = await self.opened(tmp_path, store)
        body = reply(conversation, "message",
                     {"attachments": [{"data": "aGVsbG8=é", "mime": "image/png"}]})
        lane, work = outbound.prepare(FakeDelivery(body=body, user_id="guest",
                                                   routing_key="acme"))
        assert lane == "c:"  # unparsed: the lane of replies that name no conversation
        assert await work() == "error:invalid"
        [(_, business, event, _, kind)] = sink.of("business")
        assert (business, kind, orjson.loads(event)["code"]) == ("acme", "error", "invalid")
        assert sink.of("device") == []

    async def test_a_reply_without_user_id_is_dead_lettered(self, tmp_path: Path,
                                                            store: Store) -> None:
        """A reply the broker did not vouch for is refused, and nobody is answered."""
        outbound, sink, conversation = await self.opened(tmp_path, store)
        _, work = outbound.prepare(FakeDelivery(body=reply(conversation, "message",
                                                           {"text": "x"}), routing_key="acme"))
        with pytest.raises(PermanentError) as caught:
            await work()
        assert caught.value.reason == "unauthenticated"
        assert sink.sent == []


    async def test_a_business_changed_since_it_was_read_is_read_again(
            self, tmp_path: Path, store: Store) -> None:
        """The worker keeps businesses in memory; once the AMQP user is another
        business's (or none's), its replies are refused, though the old one is cached."""
        outbound, sink, conversation = await self.opened(tmp_path, store)
        body = reply(conversation, "message", {"text": "yes"})
        _, work = outbound.prepare(FakeDelivery(body=body, user_id="guest", routing_key="acme"))
        assert await work() == "message"
        await store.remove_business("acme")
        await store.add_business(Business("acme", "someone-else"))
        _, work = outbound.prepare(FakeDelivery(body=reply(conversation, "message", {"text": "no"}),
                                                user_id="guest", routing_key="acme"))
        with pytest.raises(PermanentError) as caught:
            await work()
        assert caught.value.reason == "unknown_business"
        assert len(sink.of("device")) == 1


class TestErasure:
    async def test_a_request_erases_the_user(self, tmp_path: Path, store: Store) -> None:
        """An erase request is one lane per user; its work deletes the user's device
        queues and rows."""
        await add(store, "alice", "phone")
        sink = RecordingSink()
        erasure = Erasure(settings(tmp_path), store, lambda: KEYRING, sink)
        request = orjson.dumps({"v": 1, "type": "erase", "user": "alice",
                                "id": str(uuid.uuid4())})
        lane, work = erasure.prepare(FakeDelivery(body=request, user_id="identity"))
        assert lane == "u:alice"
        assert await work() == "erase"
        # before the store forgets the device, and again after (relayd.gdpr, step 3)
        assert sink.of("delete") == [("delete", "phone")] * 2
        assert await store.devices_of("alice") == []


class TestRouters:
    async def test_inbound_router_forwards_sealed_to_the_device_shard(
            self, tmp_path: Path, store: Store) -> None:
        """The router opens only to learn the device, and forwards the envelope as it
        came, with its kid, to that device's shard, saying it may be a retry."""
        phone = await add(store, "alice", "phone")
        sink = RecordingSink()
        s = settings(tmp_path, shards=4)
        delivery = up(phone, "start", redelivered=True)
        lane, work = inbound_router(s, lambda: KEYRING, sink).prepare(delivery)  # type: ignore[arg-type]
        assert lane == "d:phone"
        assert await work() == "routed"
        k = shard.shard_of("d:phone", 4)
        assert sink.sent == [("shard", f"relayd.inbound.{k}", delivery.body,
                              {envelope.KID_HEADER: RELAY.kid, shard.REDELIVERED_HEADER: True},
                              envelope.CONTENT_TYPE)]

    async def test_inbound_router_keeps_the_edges_device_header(
            self, tmp_path: Path, store: Store) -> None:
        """A message the edge published keeps x-relayd-device on its way to the shard
        (checked against the envelope first), so the shard's worker treats it alike; one
        sealed by another device is refused at the router."""
        phone = await add(store, "alice", "phone")
        sink = RecordingSink()
        router = inbound_router(settings(tmp_path, shards=4), lambda: KEYRING, sink)  # type: ignore[arg-type]
        delivery = TestThroughTheEdge.via_edge(phone, "phone", now_ms(), 1)
        _, work = router.prepare(delivery)
        assert await work() == "routed"
        [(_, _, _, headers, _)] = sink.sent
        assert headers == {envelope.KID_HEADER: RELAY.kid, envelope.DEVICE_HEADER: "phone"}
        with pytest.raises(EnvelopeError) as caught:
            router.prepare(TestThroughTheEdge.via_edge(phone, "laptop", now_ms(), 2))
        assert caught.value.reason == "wrong_device"

    async def test_outbound_router_forwards_with_its_origin(self, tmp_path: Path) -> None:
        """The reply is forwarded to its conversation's shard with the user_id and
        routing key the business published it with."""
        sink = RecordingSink()
        conversation = "abcdefghijklmnopqrstuvwxyz234567"
        body = reply(conversation, "message", {"text": "x"})
        lane, work = outbound_router(settings(tmp_path, shards=4), sink).prepare(  # type: ignore[arg-type]
            FakeDelivery(body=body, user_id="guest", routing_key="acme"))
        assert lane == "c:" + conversation
        assert await work() == "routed"
        k = shard.shard_of(lane, 4)
        assert sink.sent == [("shard", f"relayd.outbound.{k}", body,
                              {shard.ROUTING_KEY_HEADER: "acme", shard.USER_HEADER: "guest"},
                              "application/json")]


class TestFanOut:
    async def test_one_bad_key_costs_only_its_device(self, store: Store) -> None:
        """A device whose stored key cannot be sealed to is skipped and reported (no id
        in the log); the user's other devices get their copies."""
        good = await add(store, "alice", "phone")
        broken = Device("broken", "alice", Kem.X25519, bytes(32), good.sign_public)
        await store.add_device(broken)
        sink = RecordingSink()
        before = REGISTRY.get_sample_value("relayd_devices_skipped_total",
                                           {"reason": "bad_device_key"}) or 0.0
        with capture_logs() as logs:
            await fan_out(store, KEYRING, sink, await store.devices_of("alice"), "src-1",
                          str(uuid.uuid4()), "acme", "message", {"text": "hi"})
        assert [d[1] for d in sink.of("device")] == ["phone"]
        assert good.open(RELAY.public, sink.of("device")[0][2])["body"] == {"text": "hi"}
        [skipped] = [line for line in logs if line["event"] == "device_skipped"]
        assert skipped["reason"] == "bad_device_key"
        assert "broken" not in repr(skipped)
        assert REGISTRY.get_sample_value("relayd_devices_skipped_total",
                                         {"reason": "bad_device_key"}) == before + 1

    async def test_a_retry_in_place_sends_only_what_was_not_confirmed(
            self, tmp_path: Path, store: Store) -> None:
        """When one copy of a message is refused (a device queue down), the retry of the
        same delivery publishes only that copy again: the business event and the copies
        confirmed before are not repeated."""
        phone = await add(store, "alice", "phone")
        await add(store, "alice", "tablet")
        await add(store, "alice", "laptop")

        class DownOnce(RecordingSink):
            refused = False

            async def to_device(self, device: str, sealed: bytes,
                                receipt: str | None = None) -> None:
                if device == "laptop" and not self.refused:
                    self.refused = True
                    raise TransientError("unroutable")
                await super().to_device(device, sealed, receipt)

        sink = DownOnce()
        inbound = Inbound(settings(tmp_path), store, lambda: KEYRING, sink)
        _, work = inbound.prepare(up(phone, "start"))
        with pytest.raises(TransientError):
            await work()
        assert await work() == "start"
        assert len(sink.of("business")) == 1
        assert sorted(d[1] for d in sink.of("device")) == ["laptop", "tablet"]
