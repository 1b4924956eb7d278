"""Delivering what the relay produces: a message sealed to each device, an event to a business.

Every path that sends uses this module (inbound echoes, business replies, erasure and
retention closes): none imports another path for it. Sink is where output goes; each of
its calls completes when the broker confirmed the publish (relayd.amqp.Publisher is one).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from relayd import envelope, log, metrics, opaque, payload
from relayd.crypto import Kem, PublicKey
from relayd.errors import PermanentError
from relayd.keys import KeyRing
from relayd.store import Device, Store

_log = log.get("relayd.deliver")


class Sink(Protocol):
    """Where the handlers' output goes; each call completes when the broker confirmed it."""

    def to_business(self, business: str, body: bytes, message_id: str,
                    kind: str) -> Awaitable[None]: ...

    def to_device(self, device: str, sealed: bytes,
                  receipt: str | None = None) -> Awaitable[None]: ...


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@opaque.forgetful(maxsize=16384)
def _enc_key(kem: Kem, raw: bytes) -> PublicKey:
    return kem.public_key(raw)


def seal_down(keyring: KeyRing, device: Device, body: bytes) -> bytes:
    """`body` sealed to `device`; PermanentError("bad_device_key") when its stored key
    cannot be sealed to (a wrong length, a low-order point)."""
    try:
        return envelope.seal(body, direction="down", kid=device.id, kem=device.kem,
                             recipient=_enc_key(device.kem, device.enc_key),
                             signer=keyring.signing)
    except ValueError:  # what cryptography raises for every unusable public key
        raise PermanentError("bad_device_key", "the device's key cannot be sealed to") from None


async def once(sent: set[str] | None, target: str,
               publish: Callable[[], Awaitable[None]]) -> None:
    """`publish()` unless an earlier run of the same delivery (a retry in place) had its
    copy for `target` confirmed already: `sent` collects the targets confirmed."""
    if sent is not None and target in sent:
        return
    await publish()
    if sent is not None:
        sent.add(target)


async def fan_out(store: Store, keyring: KeyRing, sink: Sink, devices: list[Device],
                  source: str, message_id: str, sender: str, kind: str,
                  body: dict[str, Any], seqs: Mapping[str, int] | None = None,
                  sent: set[str] | None = None, receipt: str | None = None) -> None:
    """Seal one message separately to each device, with its own down seq, and publish
    (with `receipt`, the token relayd.receipts reads back, on every copy).
    `seqs`: the seqs allocated for `source` already (Store.accept_up did), else asked
    for here.

    Each device's copy is sealed and published on its own: a device whose key cannot be
    sealed to is skipped and reported (log and metric, no id), and the others get theirs.
    A failed publish fails the whole, to be retried (the same seqs again); a device whose
    copy was confirmed in an earlier run (`sent`, see once()) is not sent it again."""
    if not devices:
        return
    ts = now_ms()
    if seqs is None:
        seqs = await store.allocate_seqs(source, [d.id for d in devices], ts)

    copies = []
    for device in devices:
        target = "d:" + device.id
        if device.id not in seqs or (sent is not None and target in sent):
            continue
        try:
            sealed = seal_down(keyring, device, payload.down_payload(
                device.id, seqs[device.id], ts, message_id, sender, kind, body))
        except PermanentError as exc:
            _log.warning("device_skipped", reason=exc.reason)
            metrics.skipped(exc.reason)
            continue
        copies.append(_copy(sink, sent, target, device.id, sealed, receipt))
    # every copy published at once; their confirms awaited together
    await (copies[0] if len(copies) == 1 else asyncio.gather(*copies))


async def _copy(sink: Sink, sent: set[str] | None, target: str, device: str, sealed: bytes,
                receipt: str | None) -> None:
    """Publish one device's copy; once the broker confirmed it, note it in `sent`."""
    await sink.to_device(device, sealed, receipt)
    if sent is not None:
        sent.add(target)
