"""The key vault service: the per-user keys of several relay hosts, in one SQLite file that
erasure really empties, asked over the relay's broker (docs/privacy.md, "Where the user
keys live").

`relayd vault` owns the file (`vault.file`: relayd.store.sqlite, whose deleted rows are
overwritten and whose WAL is truncated when keys are forgotten) and answers the Vault
operations of relayd.store: add_person, import_person, people, forget_people and
all_people. A host with `store.key_vault: amqp` asks it through AmqpVault, over its own
connection:

- a request goes through the default exchange to `topology.vault_queue`, non-persistent,
  expiring after `vault.timeout`, mandatory; the queue is the service's own (exclusive to
  its connection, not durable, bounded: relayd.topology.vault), so while no service
  runs a request is returned at once and waits nowhere, and two services never share it;
- the answer comes back on direct reply-to (relayd.rpc), which the broker never stores;
- a new user's key is made by the service (`person`) and reaches the host only in an
  answer; the host then sends the account id sealed under it (`seal`). So no request
  carries a key, except `import_person`, which moves keys a store held before
  (relayd.store.pseudonym.move_keys);
- no answer within `vault.timeout`, or no service running, is StoreUnavailableError: a
  worker holds its message and tries it again in place (relayd.consume), nothing lost.

Who may ask: the vault's own broker user alone (`vault.user`; the service and its askers
log in with `vault.url`, config.vault_login). The broker refuses a publish whose
`user_id` is not the publisher's own, askers set it, and the door answers no other
(`not_allowed`): the edge, which logs in as relayd, may write the default exchange but
gets no key. Only that user may declare or read `relayd.vault` (deploy/rabbitmq/README.md),
so no one else can take the queue over while the service restarts and answer hosts in
its place; and being exclusive, no other connection may consume it at all.

The door checks, in this order and in one guard (VaultDoor.on_message): the delivery's
properties (relayd.wire), where the answer goes (`bad_reply_to`: direct reply-to only, and
a request without one is dropped), who asks (the pure asker_allowed(), `not_allowed`),
then by the pure parse() its size (`too_large`) and shape (`malformed`). A refusal is
answered with its reason; every delivery is acked once.
No pseudonym, key or id reaches a log line: the operation and the reason only.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import ChannelInvalidStateError, DeliveryError, PublishError
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from relayd import amqp, config, log, payload, rpc, topology, wire
from relayd.amqp import Delivery
from relayd.config import Settings
from relayd.crypto import b64d, b64e
from relayd.errors import (
    PermanentError,
    RelaydError,
    StoreError,
    StoreUnavailableError,
    TransientError,
)
from relayd.sdnotify import Notifier
from relayd.store.pseudonym import seal, unseal
from relayd.store.sqlite import SqliteStore

_log = log.get("relayd.vault")
MAX_REQUEST_BYTES = 262_144
CHUNK = 500  # pseudonyms per request: an answer stays far below the broker's 2 MiB
PAGE = 5_000  # pseudonyms per all_people answer
KEY_BYTES = 32
MAX_SEALED = 12 + 16 + 4 * payload.MAX_USER_ID  # nonce, tag, an account id in UTF-8
PREFETCH = 64
STANDBY_S = 1.0  # how often a standby service tries to take the queue over
PSEUDONYM = re.compile(r"[a-z2-7]{32}")  # relayd.opaque.pseudonym
_FIELDS = {"person": {"v", "op", "user"},
           "seal": {"v", "op", "user", "sealed"},
           "import_person": {"v", "op", "user", "key", "sealed"},
           "people": {"v", "op", "users"},
           "forget_people": {"v", "op", "users"},  # and seen_before_ms, if given
           "all_people": {"v", "op", "seen_before_ms", "after", "limit"}}
# Fields a request may leave out. A service older than a field refuses a request that has
# it (malformed): so a host sends it only when it is needed, and never gets less than it
# asked for (retention's forget, refused, forgets nothing).
_OPTIONAL = {"forget_people": {"seen_before_ms"}}


# --- requests, as the pure door sees them ---------------------------------------------

@dataclass(frozen=True, slots=True)
class Request:
    op: str
    users: tuple[str, ...] = ()  # person, seal, import_person: one
    key: bytes = b""
    sealed: bytes = b""
    seen_before_ms: int | None = None  # all_people: always; forget_people: if given
    after: str = ""
    limit: int = 0


def _pseudonyms(value: Any, most: int) -> tuple[str, ...]:
    if (not isinstance(value, list) or len(value) > most
            or not all(isinstance(v, str) and PSEUDONYM.fullmatch(v) for v in value)):
        raise PermanentError("malformed", f"users: at most {most} pseudonyms")
    return tuple(value)


def _blob(value: Any, name: str, least: int, most: int) -> bytes:
    try:
        raw = b64d(value) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or not least <= len(raw) <= most:
        raise PermanentError("malformed", f"{name}: base64url of {least} to {most} bytes")
    return raw


def _int(value: Any, name: str, least: int, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
        raise PermanentError("malformed", f"{name}: an integer from {least} to {most}")
    return value


def parse(body: bytes) -> Request:
    """A request from its body; PermanentError `too_large` or `malformed`."""
    data = rpc.request_object(body, MAX_REQUEST_BYTES)
    op = data.get("op")
    if (not isinstance(op, str) or op not in _FIELDS
            or data.keys() - _OPTIONAL.get(op, set()) != _FIELDS[op]
            or not payload.is_version(data["v"])):
        raise PermanentError("malformed", "not a request of the vault")
    if op in ("person", "seal", "import_person"):
        return Request(op, _pseudonyms([data["user"]], 1),
                       _blob(data["key"], "key", KEY_BYTES, KEY_BYTES) if "key" in data else b"",
                       _blob(data["sealed"], "sealed", 29, MAX_SEALED) if "sealed" in data
                       else b"")
    if op == "all_people":
        after = data["after"]
        if not isinstance(after, str) or (after and not PSEUDONYM.fullmatch(after)):
            raise PermanentError("malformed", "after: a pseudonym, or empty")
        return Request(op, seen_before_ms=_int(data["seen_before_ms"], "seen_before_ms", 0,
                                               2 ** 62),
                       after=after, limit=_int(data["limit"], "limit", 1, PAGE))
    if "seen_before_ms" in data:  # forget_people: only those not seen since
        return Request(op, _pseudonyms(data["users"], CHUNK), seen_before_ms=_int(
            data["seen_before_ms"], "seen_before_ms", 0, 2 ** 62))
    return Request(op, _pseudonyms(data["users"], CHUNK))


def asker_allowed(user_id: str | None, vault_user: str) -> bool:
    """May the sender of a request with this (broker-validated) user_id ask the vault?"""
    return user_id is not None and user_id == vault_user


def request(op: str, **fields: Any) -> bytes:
    return orjson.dumps({"v": payload.VERSION, "op": op, **fields})


def answer(ok: bool, value: Any) -> bytes:
    """An answer: {"ok": true, "result": ...} or {"ok": false, "reason": ...}."""
    return orjson.dumps({"v": payload.VERSION, "ok": ok, "result" if ok else "reason": value})


# --- the service ----------------------------------------------------------------------

class VaultDoor:
    """Applies each request to the vault file and answers it (see the module docstring)."""

    def __init__(self, keys: SqliteStore, sink: rpc.Answerer, user: str) -> None:
        self.keys = keys
        self.sink = sink
        self.user = user  # vault.user: whose requests are answered
        self._one_at_a_time = asyncio.Lock()  # requests applied in the order they came

    async def apply(self, req: Request) -> Any:
        kept: tuple[bytes, bytes] | None
        if req.op == "person":  # a key of our making, unless the person has one
            kept = await self.keys.add_person(req.users[0], ChaCha20Poly1305.generate_key(),
                                              b"")
        elif req.op == "seal":
            kept = await self.keys.seal_person(req.users[0], req.sealed)
        elif req.op == "import_person":
            kept = await self.keys.import_person(req.users[0], req.key, req.sealed)
        else:
            return await self._read(req)
        return None if kept is None else [b64e(kept[0]), b64e(kept[1])]

    async def _read(self, req: Request) -> Any:
        if req.op == "people":
            found = await self.keys.people(list(req.users))
            return {p: [b64e(k), b64e(s)] for p, (k, s) in found.items()}
        if req.op == "forget_people":
            return await self.keys.forget_people(list(req.users),
                                                 seen_before_ms=req.seen_before_ms)
        return await self.keys.people_page(req.seen_before_ms or 0, req.after, req.limit)

    async def on_message(self, delivery: Delivery) -> None:
        """The one guard: whatever happens below, the delivery is acked once."""
        op, outcome = "", "failed"
        try:
            async with self._one_at_a_time:
                op, outcome = await self._handle(delivery)
        except Exception as exc:  # a bug, or the answer's publish: the asker asks again
            _log.error("vault_failed", error=type(exc).__name__)
        finally:
            with contextlib.suppress(Exception):
                await delivery.ack()
        if outcome != "answered":
            _log.info("vault_refused", op=op, reason=outcome)

    async def _handle(self, delivery: Delivery) -> tuple[str, str]:
        """Answer one delivery where it may be answered; return (op, outcome)."""
        try:
            wire.check(delivery.headers)
            to = rpc.reply_to(delivery)
        except PermanentError as exc:  # refused unanswered: nowhere it may go
            return "", exc.reason
        if to is None:
            return "", "bad_reply_to"
        if not asker_allowed(delivery.user_id, self.user):
            op, outcome, body = "", "not_allowed", answer(False, "not_allowed")
        else:
            op, outcome, body = await self._answer(delivery.body)
        await self.sink.answer(to.queue, to.correlation_id, body)
        return op, outcome

    async def _answer(self, body: bytes) -> tuple[str, str, bytes]:
        """(op, outcome, the answer's body) of one request."""
        op = ""
        try:
            req = parse(body)
            op = req.op
            return op, "answered", answer(True, await self.apply(req))
        except PermanentError as exc:
            return op, exc.reason, answer(False, exc.reason)
        except (TransientError, StoreUnavailableError):
            return op, "busy", answer(False, "busy")
        except RelaydError:
            return op, "store_failed", answer(False, "store_failed")


async def serve(settings: Settings, stop: asyncio.Event,
                ready: asyncio.Event | None = None, notifier: Notifier | None = None) -> None:
    """Answer the vault's requests until `stop` is set, reconnecting when the link is
    lost; `ready` is set each time the queue is consumed. `notifier` tells systemd READY
    once the service serves or stands by (another service holds the queue: it takes
    over when that one goes), and in STATUS which of the two, or that the broker is
    out of reach."""
    user, login = config.vault_user(settings), config.vault_login(settings)
    keys = SqliteStore(settings.vault.file)
    spec = topology.vault(settings.topology)
    notifier = notifier or Notifier({})

    def down() -> None:
        notifier.status("waiting for the broker")
        if ready is not None:
            ready.clear()

    async def session(connection: AbstractConnection, lost: asyncio.Event) -> None:
        channel = await amqp.open_channel(connection, PREFETCH)
        try:
            await topology.declare(channel, [spec])
        except aiormq.exceptions.ChannelLockedResource:  # another service holds it
            _log.warning("vault_standby", reason="another vault service holds the queue")
            notifier.ready("standby: another vault service holds the queue")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(amqp.wait_any(stop, lost), STANDBY_S)
            return
        channel.close_callbacks.add(lambda *_: lost.set())
        # answers on a channel of their own: the broker may close a publisher's
        door = VaultDoor(keys, amqp.Publisher(await amqp.open_channel(connection), settings,
                                              b""),  # no secret: it names no device queue
                         user)
        queue = await channel.get_queue(spec.name, ensure=False)
        await queue.consume(door.on_message)
        _log.info("vault_serving", file=str(settings.vault.file))
        notifier.ready("serving")
        if ready is not None:
            ready.set()
        await amqp.wait_any(stop, lost)

    try:
        await amqp.keep_connected(login, "relayd-vault", "vault", stop, session, down)
    finally:
        notifier.stopping("stopping")
        await keys.close()


# --- a relay host's side --------------------------------------------------------------

class AmqpVault:
    """The Vault of relayd.store, asked of the vault service over the broker; every
    failure is the store's error (StoreUnavailableError when it may pass)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._user = config.vault_user(settings)  # set on each request, as the broker checks
        self._login = config.vault_login(settings)
        self._connection: AbstractConnection | None = None
        self._asker: rpc.Asker | None = None
        self._connecting = asyncio.Lock()

    async def _ready(self) -> rpc.Asker:
        async with self._connecting:
            if (self._asker is None or self._connection is None
                    or self._connection.is_closed or self._asker.channel.is_closed):
                await self.close()
                self._connection = await amqp.connect(self._login, "relayd-vault-client")
                self._asker = rpc.Asker(await amqp.open_channel(self._connection))
                await self._asker.listen()
            return self._asker

    async def _ask(self, op: str, **fields: Any) -> Any:
        timeout = self.settings.vault.timeout
        try:
            asker = await self._ready()
            body = await asker.ask("", self.settings.topology.vault_queue, aio_pika.Message(
                request(op, **fields), content_type=amqp.JSON,
                delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                expiration=timeout, user_id=self._user), timeout, mandatory=True)
        except TimeoutError:
            raise StoreUnavailableError("the key vault did not answer in time") from None
        except (PublishError, DeliveryError):
            raise StoreUnavailableError("no key vault service is running") from None
        except (*amqp.CONNECT_ERRORS, ChannelInvalidStateError, RuntimeError) as exc:
            await self.close()
            raise StoreUnavailableError(f"key vault: {type(exc).__name__}") from None
        try:
            got = orjson.loads(body)
            ok, value = got["ok"], got["result" if got["ok"] else "reason"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise StoreError("the key vault's answer is not one") from None
        if ok:
            return value
        if value == "busy":
            raise StoreUnavailableError("the key vault is busy")
        raise StoreError(f"the key vault refused a request: {value}")

    async def add_person(self, user: str, key: bytes, sealed: bytes) -> tuple[bytes, bytes]:
        """The person of `user`, its key made by the service (so that no request carries
        a key): `key` only opens `sealed`, to seal the account id again under that one."""
        account = unseal(key, "user", user, sealed)
        if account is None:
            raise StoreError("add_person: the account id does not open under its key")
        kept = await self._ask("person", user=user)
        if not kept[1]:  # made now (or by a host that has not sealed yet): seal it
            made = b64d(kept[0])
            kept = await self._ask("seal", user=user,
                                   sealed=b64e(seal(made, "user", user, account)))
            if kept is None:
                raise TransientError("store_busy", "the person was forgotten meanwhile")
        return b64d(kept[0]), b64d(kept[1])

    async def import_person(self, user: str, key: bytes,
                            sealed: bytes) -> tuple[bytes, bytes]:
        kept = await self._ask("import_person", user=user, key=b64e(key),
                               sealed=b64e(sealed))
        return b64d(kept[0]), b64d(kept[1])

    async def people(self, users: Sequence[str]) -> dict[str, tuple[bytes, bytes]]:
        found: dict[str, tuple[bytes, bytes]] = {}
        for start in range(0, len(users), CHUNK):
            got = await self._ask("people", users=list(users[start:start + CHUNK]))
            found.update((p, (b64d(k), b64d(s))) for p, (k, s) in got.items())
        return found

    async def forget_people(self, users: Sequence[str], *,
                            seen_before_ms: int | None = None) -> int:
        since = {} if seen_before_ms is None else {"seen_before_ms": seen_before_ms}
        gone = 0
        for start in range(0, len(users), CHUNK):
            gone += int(await self._ask("forget_people", users=list(users[start:start + CHUNK]),
                                        **since))
        return gone

    async def all_people(self, seen_before_ms: int) -> list[str]:
        found: list[str] = []
        while True:
            page = await self._ask("all_people", seen_before_ms=seen_before_ms,
                                   after=found[-1] if found else "", limit=PAGE)
            found += page
            if len(page) < PAGE:
                return found

    async def close(self) -> None:
        connection, self._connection, self._asker = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(*amqp.CONNECT_ERRORS, RuntimeError):
                await connection.close()
