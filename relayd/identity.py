"""Requests from the operator's identity service: register a device, revoke one, erase a
user (docs/protocol.md, "Requests from the identity service").

They come through one door, `topology.gdpr_queue`, consumed by the gdpr role, and are
trusted by the broker-validated `user_id` alone (`gdpr.identity_user`). Checked in this
order: who sent it (`unauthenticated`), where it wants its answer (`bad_reply_to`: only
a direct reply-to name, `amq.rabbitmq.reply-to.…`, so that an answer reaches nothing but
the asker's own channel), then, by the pure parse(), its size (`too_large`), its shape
(`malformed`) and, for a registration, its public keys with relayd.crypto's checks
(`weak_key`). The first two refusals are dead-lettered unanswered: relayd answers the
identity service only, and only where it may. Any later refusal is answered, then
dead-lettered with the same reason. Identity applies a request in its user's lane (an
erasure and a registration of one user never interleave) and answers it, when it asked
for an answer, after its work and before the ack.

A registration declares the device's queue before it writes the device, a revocation
deletes the device before its queue (as `relayd device add` and `remove` do): its queue's
deletion cancels the edge's consumer, which closes a connected device (4401), and the
device's next login is refused. Both are idempotent: a repeat answers `unchanged`.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from relayd import payload
from relayd.amqp import Delivery
from relayd.config import Settings
from relayd.consume import Work
from relayd.crypto import Kem, WeakKeyError, b64d, ed25519_public
from relayd.errors import PermanentError, TransientError
from relayd.gdpr import EraseRequest, Erasure, ErasureSink
from relayd.keys import KeySource
from relayd.rpc import Answerer, ReplyTo, reply_to, request_object
from relayd.store import Device, Store

MAX_REQUEST_BYTES = 16_384  # a hybrid registration is under 2 KiB
_FIELDS = {"register": {"v", "type", "id", "user", "device", "kem", "enc_key", "sign_key"},
           "revoke": {"v", "type", "id", "user", "device"}}


class IdentitySink(ErasureSink, Answerer, Protocol):
    """What the identity service's requests publish and change on the broker
    (amqp.Publisher is one)."""

    def declare_device_queue(self, device: str) -> Awaitable[None]: ...


@dataclass(frozen=True, slots=True)
class Register:
    device: Device
    id: str

    @property
    def user(self) -> str:
        return self.device.user


@dataclass(frozen=True, slots=True)
class Revoke:
    user: str
    device: str
    id: str


Request = Register | Revoke | EraseRequest


def answer(accepted: bool, word: str) -> bytes:
    """An answer's body: `word` is the outcome if accepted, else the reason."""
    return orjson.dumps({"v": payload.VERSION, "type": "answer", "accepted": accepted,
                          "outcome" if accepted else "reason": word})


def _text(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise PermanentError("malformed", f"{key} is a string")
    return value


def _key(decode: Any, raw: str, name: str) -> bytes:
    """A public key from base64url, checked by relayd.crypto: malformed or weak_key."""
    try:
        key = b64d(raw)
        decode(key)
    except WeakKeyError:
        raise PermanentError("weak_key", f"{name} must never be used") from None
    except ValueError:
        raise PermanentError("malformed", f"{name} is not a public key of its kind") from None
    return key


def parse_enrolment(data: dict[str, Any]) -> Register | Revoke:
    """A register or revoke request from its decoded JSON; PermanentError otherwise."""
    kind = data.get("type")
    if (not isinstance(kind, str) or kind not in _FIELDS or data.keys() != _FIELDS[kind]
            or not payload.is_version(data["v"])):
        raise PermanentError("malformed", "not a request of the contract")
    user, device, request_id = _text(data, "user"), _text(data, "device"), _text(data, "id")
    if not payload.is_user_id(user) or not payload.DEVICE_ID.fullmatch(device):
        raise PermanentError("malformed", "user or device is not an id")
    try:
        request_id = str(uuid.UUID(request_id)) if len(request_id) == 36 else ""
    except ValueError:
        request_id = ""
    if not request_id:
        raise PermanentError("malformed", "id is a UUID")
    if kind == "revoke":
        return Revoke(user, device, request_id)
    try:
        kem = Kem(_text(data, "kem"))
    except ValueError:
        raise PermanentError("malformed", "kem is not a KEM of the contract") from None
    enc = _key(kem.public_key, _text(data, "enc_key"), "enc_key")
    sign = _key(ed25519_public, _text(data, "sign_key"), "sign_key")
    return Register(Device(device, user, kem, enc, sign), request_id)


class Identity:
    """The gdpr role's handler: every request of the identity service."""

    def __init__(self, settings: Settings, store: Store, keys: KeySource,
                 sink: IdentitySink) -> None:
        self.settings = settings
        self.store = store
        self.sink = sink
        self.erasure = Erasure(settings, store, keys, sink)

    def authenticate(self, amqp_user: str | None) -> str:
        if not amqp_user or amqp_user != self.settings.gdpr.identity_user:
            raise PermanentError("unauthenticated", "requests come from gdpr.identity_user")
        return amqp_user

    def parse(self, body: bytes, amqp_user: str) -> Request:
        """A request from the identity service (authenticated already); PermanentError."""
        data = request_object(body, MAX_REQUEST_BYTES)
        if data.get("type") == "erase":
            return self.erasure.parse(body, amqp_user)
        return parse_enrolment(data)

    def prepare(self, delivery: Delivery) -> tuple[str | None, Work]:
        amqp_user = self.authenticate(delivery.user_id)  # refused unanswered, as is
        to = reply_to(delivery)  # a reply_to that is not direct reply-to
        try:
            request = self.parse(delivery.body, amqp_user)
        except PermanentError as exc:
            refused = exc  # `exc` is unbound after the except block
            return None, lambda: self._refuse(to, refused)
        again = bool(delivery.redelivered)
        return "u:" + request.user, lambda: self._apply(request, to, again)

    async def _refuse(self, to: ReplyTo | None, exc: PermanentError) -> str:
        if to is not None:
            await self.sink.answer(to.queue, to.correlation_id, answer(False, exc.reason))
        raise exc

    async def _apply(self, request: Request, to: ReplyTo | None, redelivered: bool) -> str:
        try:
            if isinstance(request, Register):
                kind, outcome = "register", await self.register(request.device)
            elif isinstance(request, Revoke):
                kind, outcome = "revoke", await self.revoke(request.user, request.device)
            else:
                kind, outcome = await self.erasure.handle(request, redelivered), "erased"
        except PermanentError as exc:
            return await self._refuse(to, exc)
        if to is not None:
            await self.sink.answer(to.queue, to.correlation_id, answer(True, outcome))
        return kind

    async def register(self, device: Device) -> str:
        """Declare the device's queue, then register it: `registered`, or `unchanged` if
        it is registered with these very keys; PermanentError `device_exists` if with
        others (revoke it first)."""
        existing = await self.store.device(device.id)
        if existing is None or existing == device:
            await self.sink.declare_device_queue(device.id)
            if await self.store.add_device(device):
                return "registered"
            existing = await self.store.device(device.id)
            if existing is None:
                raise TransientError("raced", "the device was revoked meanwhile")
        if existing != device:
            raise PermanentError("device_exists", "the device is registered with other keys")
        return "unchanged"

    async def revoke(self, user: str, device: str) -> str:
        """Unregister the device, then delete its queue (also when it is not registered:
        that finishes an interrupted revocation): `revoked` or `unchanged`;
        PermanentError `wrong_user` if the device is another user's."""
        existing = await self.store.device(device)
        if existing is not None and existing.user != user:
            raise PermanentError("wrong_user", "the device is another user's")
        removed = existing is not None and await self.store.remove_device(device)
        await self.sink.delete_device_queue(device)
        return "revoked" if removed else "unchanged"
