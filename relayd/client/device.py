"""The device side: seal messages up to the relay and open what comes down."""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric import ed25519

from relayd import envelope
from relayd.crypto import Kem, PrivateKey, b64d, b64e, ed25519_public, raw_public
from relayd.errors import EnvelopeError


@dataclass(frozen=True, slots=True)
class RelayPublic:
    """The relay's public half, as `relayd keys show` prints it."""

    kid: str
    kem: Kem
    enc_public_key: bytes
    sign_public_key: bytes

    @classmethod
    def from_json(cls, data: dict[str, str] | str | bytes) -> RelayPublic:
        """ValueError (WeakKeyError among them) for a key relayd.crypto refuses."""
        info: dict[str, str] = data if isinstance(data, dict) else orjson.loads(data)
        relay = cls(info["kid"], Kem(info["kem"]), b64d(info["enc_public_key"]),
                    b64d(info["sign_public_key"]))
        relay.kem.public_key(relay.enc_public_key)
        ed25519_public(relay.sign_public_key)
        return relay


@dataclass(slots=True)
class DeviceKeys:
    """One device: its id, its HPKE and Ed25519 private keys, and its next `seq`."""

    device: str
    kem: Kem
    enc_private_raw: bytes
    sign_private: ed25519.Ed25519PrivateKey
    _seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def generate(cls, device: str, kem: Kem = Kem.X25519) -> DeviceKeys:
        _, raw = kem.generate()
        return cls(device, kem, raw, ed25519.Ed25519PrivateKey.generate())

    @property
    def enc_private(self) -> PrivateKey:
        return self.kem.private_key(self.enc_private_raw)

    @property
    def enc_public(self) -> bytes:
        return raw_public(self.kem, self.enc_private_raw)

    @property
    def sign_public(self) -> bytes:
        return self.sign_private.public_key().public_bytes_raw()

    def registration(self, user: str) -> dict[str, str]:
        """What an operator passes to `relayd device add`."""
        return {"user": user, "device": self.device, "kem": self.kem.value,
                "enc_key": b64e(self.enc_public), "sign_key": b64e(self.sign_public)}

    def payload(self, to: str, kind: str, body: dict[str, Any] | None = None, *,
                seq: int | None = None, message_id: str | None = None,
                ts: int | None = None) -> bytes:
        """An up payload; seq counts up from 1 unless given."""
        return orjson.dumps({
            "v": 1, "device": self.device, "seq": next(self._seq) if seq is None else seq,
            "ts": int(time.time() * 1000) if ts is None else ts,
            "id": message_id or str(uuid.uuid4()), "to": to, "type": kind, "body": body or {},
        })

    def seal(self, relay: RelayPublic, payload: bytes) -> bytes:
        """The AMQP body for `payload`, sealed to the relay's current key."""
        return envelope.seal(payload, direction="up", kid=relay.kid, kem=relay.kem,
                             recipient=relay.kem.public_key(relay.enc_public_key),
                             signer=self.sign_private)

    def open(self, relay: RelayPublic, body: bytes) -> dict[str, Any]:
        """Open and verify a down message; EnvelopeError if anything is wrong."""
        signature, payload = envelope.open_sealed(body, direction="down", kid=self.device,
                                                  kem=self.kem, private=self.enc_private)
        envelope.verify(signature, payload, direction="down",
                        signer=ed25519_public(relay.sign_public_key))
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise EnvelopeError("malformed", "payload is not JSON") from None
        if not isinstance(message, dict) or message.get("device") != self.device:
            raise EnvelopeError("malformed", "not addressed to this device")
        return message
