"""Whatever the input, the code below the consumer raises only relayd's own errors.

Each door that parses input is fed hostile values (hypothesis): any bytes, any JSON, any
text (lone surrogates and non-ASCII where base64 is expected included), values of every
type in every field. It must return, or raise a RelaydError that says why; a library's
ValueError or TypeError escaping would end as internal_error, or never be settled.
"""

from __future__ import annotations

import base64
import inspect
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd import bodies, config, gdpr, outbound, payload
from relayd.config import Limits
from relayd.crypto import Kem, raw_public
from relayd.errors import (
    EnvelopeError,
    PermanentError,
    RelaydError,
    ReplyError,
    StoreError,
    StoreUnavailableError,
    TransientError,
)
from relayd.inbound import open_up
from relayd.keys import KeyRing, RelayKey
from relayd.store import postgres
from tests.unit.helpers import DEVICES, RELAYS, SMALL, up_claims

LIMITS = Limits(max_text_chars=50, max_inline_attachment_bytes=40, max_attachments=3,
                max_envelope_bytes=4000)
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates too
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | ANY_TEXT
           | st.sampled_from(["start", "message", "close", "read", "x", "1", ""]))
BODY_KEYS = st.sampled_from([  # every key a body type names (relayd.bodies)
    "text", "data", "mime", "name", "url", "key", "sha256", "size", "attachments", "intent",
    "group", "quick_reply", "list_picker", "time_picker", "rich_link", "reply_to",
    "message_id", "options", "option", "items", "item", "sections", "selected", "multiple",
    "slots", "slot", "start", "duration", "timezone", "title", "subtitle", "image", "emoji",
    "remove", "id"])
JSON_ISH = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    ANY_TEXT | BODY_KEYS, inner, max_size=5), max_leaves=12)
BASE64_ISH = st.one_of(
    ANY_TEXT,
    st.binary(max_size=45).map(lambda b: base64.b64encode(b).decode()),
    st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode() + "é"),
)
ATTACHMENT = st.fixed_dictionaries(
    {"data": BASE64_ISH, "mime": ANY_TEXT}, optional={"name": JSON_ISH}) | JSON_ISH
BODY = st.one_of(JSON_ISH, st.fixed_dictionaries(
    {}, optional={"text": JSON_ISH, "attachments": st.lists(ATTACHMENT, max_size=4) | JSON_ISH,
                  "intent": JSON_ISH, "group": JSON_ISH}), st.dictionaries(BODY_KEYS, JSON_ISH,
                                                                        max_size=4))
KIND = st.sampled_from(sorted(payload.UP_TYPES)) | JSON_ISH


def claims_strategy() -> st.SearchStrategy[dict[str, Any]]:
    """Up payloads: a valid one with any of its fields replaced, dropped, or added to."""
    field = st.sampled_from(["v", "device", "seq", "ts", "id", "to", "type", "body"])
    return st.builds(
        lambda kind, body, changes, drop, extra: {
            **{k: v for k, v in up_claims(type=kind, body=body).items() if k != drop},
            **changes, **extra},
        KIND, BODY, st.dictionaries(field, JSON_ISH, max_size=3), st.none() | field,
        st.dictionaries(ANY_TEXT, JSON_ISH, max_size=1))


def raised(call: Callable[[], object]) -> RelaydError | None:
    """The RelaydError `call` raised, or None; any other exception fails the test."""
    try:
        call()
    except RelaydError as exc:
        return exc
    return None


def dumps(value: Any) -> bytes:
    """JSON bytes of `value`, or bytes that are not JSON where orjson cannot encode it."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return repr(value).encode("utf-8", "surrogatepass")


def reply_bytes() -> st.SearchStrategy[bytes]:
    data = st.builds(lambda kind, body, changes: {
        "v": 1, "type": kind, "conversation": "abcdefghijklmnopqrstuvwxyz234567",
        "id": str(uuid.uuid4()), "body": body, **changes},
        st.sampled_from(sorted(payload.REPLY_TYPES)) | JSON_ISH, BODY,
        st.dictionaries(st.sampled_from(["v", "type", "conversation", "id", "body", "x"]),
                        JSON_ISH, max_size=2))
    return st.binary(max_size=200) | data.map(dumps) | JSON_ISH.map(dumps)


def keyring() -> KeyRing:
    relay = RELAYS[Kem.X25519]
    key = RelayKey(relay.kid, relay.kem, datetime.now(UTC), relay.private,
                   raw_public(relay.kem, relay.private_raw))
    return KeyRing({relay.kid: key}, key, relay.signing, b"s" * 32)


KEYRING = keyring()
GDPR = config.parse({"amqp": {"url": "amqp://localhost"}, "store": {"url": "sqlite:///x"},
                     "keys": {"dir": "/k"}, "gdpr": {"identity_user": "identity"}}, environ={})
ERASURE = gdpr.Erasure(GDPR, None, None, None)  # type: ignore[arg-type]


class TestUpPayloads:
    @SMALL
    @given(st.binary(max_size=300) | JSON_ISH.map(dumps))
    def test_peek_device(self, body: bytes) -> None:
        """Any payload bytes: a device id, or EnvelopeError."""
        error = raised(lambda: payload.peek_device(body))
        assert error is None or isinstance(error, EnvelopeError)

    @SMALL
    @given(claims_strategy())
    def test_validate_up(self, claims: dict[str, Any]) -> None:
        """Any fields of any type: an Up, or EnvelopeError("malformed")."""
        error = raised(lambda: payload.validate_up(claims, LIMITS))
        assert error is None or (isinstance(error, EnvelopeError) and error.reason == "malformed")

    @SMALL
    @given(KIND, BODY, st.sampled_from(["user", "business"]))
    def test_body_problem(self, kind: Any, body: Any, sender: Any) -> None:
        """Any body from either side: None, or the problem as text; never an exception."""
        problem = bodies.problem(kind, body, LIMITS, sender)
        assert problem is None or isinstance(problem, str)

    @pytest.mark.parametrize("data", ["aGVsbG8=é", "\u00e9\u00e9\u00e9\u00e9", "\udcff"])
    def test_non_ascii_base64_is_malformed(self, data: str) -> None:
        """Text that is not ASCII where base64 is expected is malformed, not a crash."""
        claims = up_claims(body={"attachments": [{"data": data, "mime": "image/png"}]})
        with pytest.raises(EnvelopeError) as caught:
            payload.validate_up(claims, LIMITS)
        assert caught.value.reason == "malformed"

    @SMALL
    @given(st.binary(max_size=400), st.none() | JSON_ISH)
    def test_open_up(self, body: bytes, kid: Any) -> None:
        """Any envelope with any relayd-kid header: opened, or EnvelopeError."""
        for candidate in (kid, RELAYS[Kem.X25519].kid):
            error = raised(lambda c=candidate: open_up(body, c, KEYRING, LIMITS))
            assert error is None or isinstance(error, EnvelopeError)

    @SMALL
    @given(claims_strategy())
    def test_open_up_of_sealed_hostile_payloads(self, claims: dict[str, Any]) -> None:
        """A well-sealed envelope around any payload: opened, or EnvelopeError."""
        device = DEVICES[Kem.X25519]
        sealed = device.seal(RELAYS[Kem.X25519].public, dumps(claims))
        error = raised(lambda: open_up(sealed, RELAYS[Kem.X25519].kid, KEYRING, LIMITS))
        assert error is None or isinstance(error, EnvelopeError)


class TestReplies:
    @SMALL
    @given(reply_bytes())
    def test_parse_reply(self, body: bytes) -> None:
        """Any reply bytes: a Reply, or ReplyError with a contract code."""
        error = raised(lambda: payload.parse_reply(body, LIMITS))
        assert error is None or (isinstance(error, ReplyError)
                                 and error.reason in payload.ERROR_CODES)

    @SMALL
    @given(reply_bytes(), st.none() | ANY_TEXT, ANY_TEXT)
    def test_outbound_parse_never_raises(self, body: bytes, user: str | None,
                                         routing_key: str) -> None:
        """outbound.parse keeps a rejection to answer: it never raises, so the reply's
        lane is always known and its business gets an error event."""
        incoming = outbound.parse(body, user, routing_key, LIMITS)
        assert (incoming.reply is None) == (incoming.rejection is not None)
        assert outbound.lane(incoming).startswith("c:")

    @SMALL
    @given(reply_bytes())
    def test_reply_ref_never_raises(self, body: bytes) -> None:
        """The best-effort reference of a refused reply never raises."""
        ref, conversation = payload.reply_ref(body)
        assert ref is None or isinstance(ref, str)
        assert conversation is None or isinstance(conversation, str)

    @pytest.mark.parametrize("data", ["aGVsbG8=é", "\u00e9\u00e9\u00e9\u00e9"])
    def test_non_ascii_base64_is_invalid(self, data: str) -> None:
        """Text that is not ASCII where base64 is expected is answered as invalid."""
        body = orjson.dumps({"v": 1, "type": "message",
                             "conversation": "abcdefghijklmnopqrstuvwxyz234567",
                             "id": str(uuid.uuid4()),
                             "body": {"attachments": [{"data": data, "mime": "image/png"}]}})
        with pytest.raises(ReplyError) as caught:
            payload.parse_reply(body, LIMITS)
        assert caught.value.reason == "invalid"


class TestEraseRequests:
    @SMALL
    @given(st.binary(max_size=200) | JSON_ISH.map(dumps) | st.builds(
        lambda changes: dumps({"v": 1, "type": "erase", "user": "alice",
                               "id": str(uuid.uuid4()), **changes}),
        st.dictionaries(st.sampled_from(["v", "type", "user", "id"]), JSON_ISH, max_size=2)))
    def test_parse(self, body: bytes) -> None:
        """Any request from the identity service: an EraseRequest, or PermanentError."""
        error = raised(lambda: ERASURE.parse(body, "identity"))
        assert error is None or isinstance(error, PermanentError)



ASYNCPG_ERRORS = sorted((c for _, c in inspect.getmembers(asyncpg.exceptions, inspect.isclass)
                         if issubclass(c, Exception)), key=lambda c: c.__name__)


class TestPostgresErrors:
    """A database failure becomes one of the store's three errors, and a failover or an
    outage one that the consumer retries (relayd.consume), never a bug's internal_error."""

    @pytest.mark.parametrize("error", ASYNCPG_ERRORS, ids=lambda c: c.__name__)
    def test_every_asyncpg_error_is_a_store_error(self, error: type[Exception]) -> None:
        """Each of asyncpg's exceptions maps to StoreError, store_busy or unavailable."""
        mapped = postgres._error(error("x"))
        assert type(mapped) in (StoreError, TransientError, StoreUnavailableError)
        assert not isinstance(mapped, TransientError) or mapped.reason == "store_busy"

    @pytest.mark.parametrize("error", [
        asyncpg.ReadOnlySQLTransactionError,  # a primary demoted, a standby, read-only mode
        asyncpg.AdminShutdownError, asyncpg.CrashShutdownError, asyncpg.CannotConnectNowError,
        asyncpg.IdleSessionTimeoutError, asyncpg.IdleInTransactionSessionTimeoutError,
        asyncpg.ConnectionDoesNotExistError, asyncpg.ConnectionFailureError,
        asyncpg.TransactionResolutionUnknownError, asyncpg.TooManyConnectionsError,
        asyncpg.DiskFullError, asyncpg.OutOfMemoryError, asyncpg.PostgresIOError,
        asyncpg.InterfaceError, asyncpg.InternalClientError, ConnectionResetError,
        TimeoutError])
    def test_failover_and_outage_are_unavailable(self, error: type[Exception]) -> None:
        """What a failover or an outage raises holds the message without counting."""
        assert isinstance(postgres._error(error("x")), StoreUnavailableError)

    @pytest.mark.parametrize("error", [
        asyncpg.SerializationError, asyncpg.DeadlockDetectedError,
        asyncpg.LockNotAvailableError, asyncpg.QueryCanceledError])
    def test_contention_is_busy(self, error: type[Exception]) -> None:
        """A conflict that passes on a second try is store_busy."""
        mapped = postgres._error(error("x"))
        assert isinstance(mapped, TransientError)
        assert mapped.reason == "store_busy"

    @pytest.mark.parametrize("error", [
        asyncpg.UndefinedTableError, asyncpg.PostgresSyntaxError, asyncpg.UniqueViolationError,
        asyncpg.InFailedSQLTransactionError, asyncpg.DataError,
        asyncpg.InsufficientPrivilegeError])
    def test_a_wrong_statement_is_a_store_error(self, error: type[Exception]) -> None:
        """A statement or schema the database refuses stays a StoreError (a bug, or an
        operator's to fix): retrying it would change nothing."""
        assert type(postgres._error(error("x"))) is StoreError
