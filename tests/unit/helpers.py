"""Shared material for the unit tier: hypothesis settings and throwaway parties' keys."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, settings

from relayd.client.device import DeviceKeys, RelayPublic
from relayd.crypto import Kem, PrivateKey, raw_public, signing_public

# Modest example counts (ML-KEM is slower than X25519), no deadline, and no example
# database: the unit tier writes nothing outside the pytest temporary directory.
FAST = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SMALL = settings(max_examples=30, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Relay:
    """The relay's side of one KEM: an HPKE key under `kid` and the signing key."""

    kid: str
    kem: Kem
    private_raw: bytes
    private: PrivateKey
    signing: ed25519.Ed25519PrivateKey

    @classmethod
    def generate(cls, kem: Kem, kid: str = "r2026-11") -> Relay:
        private, raw = kem.generate()
        return cls(kid, kem, raw, private, ed25519.Ed25519PrivateKey.generate())

    @property
    def public(self) -> RelayPublic:
        return RelayPublic(self.kid, self.kem, raw_public(self.kem, self.private_raw),
                           signing_public(self.signing))


RELAYS = {kem: Relay.generate(kem) for kem in Kem}
DEVICES = {kem: DeviceKeys.generate(f"dev-{kem.value.lower()}", kem) for kem in Kem}


def up_claims(**overrides: Any) -> dict[str, Any]:
    """A valid up payload as parsed JSON, with `overrides` applied."""
    claims: dict[str, Any] = {"v": 1, "device": "dev-1", "seq": 1, "ts": 1_790_000_000_000,
                              "id": str(uuid.uuid4()), "to": "acme", "type": "message",
                              "body": {"text": "hello"}}
    claims.update(overrides)
    return claims
