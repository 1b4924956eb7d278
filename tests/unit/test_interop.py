"""Interoperability with pyhpke, an independent RFC 9180 implementation (X25519 suite)."""

from __future__ import annotations

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from pyhpke import AEADId, CipherSuite, KDFId, KEMId

from relayd import envelope, payload
from relayd.client.device import DeviceKeys
from relayd.config import Limits
from relayd.crypto import Kem
from relayd.errors import EnvelopeError
from tests.unit.helpers import Relay

SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256,
                        AEADId.CHACHA20_POLY1305)
ENC = 32  # DHKEM(X25519) enc length
MESSAGE_ID = "0b9e4c1e-5a43-4f7e-8d55-3c3f0f7f2a11"


def _pyhpke_seal(public_raw: bytes, info: bytes, plaintext: bytes) -> bytes:
    """Single-shot Base-mode seal with pyhpke; returns enc || ct."""
    enc, sender = SUITE.create_sender_context(SUITE.kem.deserialize_public_key(public_raw),
                                              info=info)
    return enc + sender.seal(plaintext, aad=b"")


def _pyhpke_open(private_raw: bytes, info: bytes, body: bytes) -> bytes:
    """Single-shot Base-mode open with pyhpke of enc || ct."""
    recipient = SUITE.create_recipient_context(body[:ENC],
                                               SUITE.kem.deserialize_private_key(private_raw),
                                               info=info)
    return recipient.open(body[ENC:], aad=b"")


@pytest.fixture
def relay() -> Relay:
    return Relay.generate(Kem.X25519, kid="r2026-11")


@pytest.fixture
def device() -> DeviceKeys:
    return DeviceKeys.generate("phone-1", Kem.X25519)


class TestPyhpkeToRelayd:
    def test_up_message_sealed_by_pyhpke_opens_verifies_and_validates(
        self, relay: Relay, device: DeviceKeys
    ) -> None:
        """An up message built and sealed with pyhpke passes open, verify and validate_up."""
        plain = orjson.dumps({"v": 1, "device": device.device, "seq": 3,
                              "ts": 1_790_000_000_000, "id": MESSAGE_ID, "to": "acme",
                              "type": "message", "body": {"text": "from pyhpke"}})
        signature = device.sign_private.sign(b"relayd/v1 up\n" + plain)
        body = _pyhpke_seal(relay.public.enc_public_key, b"relayd/v1 up " + b"r2026-11",
                            signature + plain)

        got_signature, got_payload = envelope.open_sealed(
            body, direction="up", kid="r2026-11", kem=Kem.X25519, private=relay.private)
        envelope.verify(got_signature, got_payload, direction="up",
                        signer=ed25519.Ed25519PublicKey.from_public_bytes(device.sign_public))
        claims, device_id = payload.peek_device(got_payload)
        up = payload.validate_up(claims, Limits())
        assert device_id == device.device
        assert (up.seq, up.id, up.to, up.body) == (3, MESSAGE_ID, "acme",
                                                    {"text": "from pyhpke"})

    def test_pyhpke_message_with_other_info_is_refused(
        self, relay: Relay, device: DeviceKeys
    ) -> None:
        """A pyhpke message sealed with another kid in its info fails to decrypt in relayd."""
        plain = device.payload("acme", "read")
        signature = device.sign_private.sign(b"relayd/v1 up\n" + plain)
        body = _pyhpke_seal(relay.public.enc_public_key, b"relayd/v1 up r2026-10",
                            signature + plain)
        with pytest.raises(EnvelopeError) as caught:
            envelope.open_sealed(body, direction="up", kid="r2026-11", kem=Kem.X25519,
                                 private=relay.private)
        assert caught.value.reason == "decrypt_failed"


class TestRelaydToPyhpke:
    def test_down_message_sealed_by_relayd_opens_in_pyhpke(
        self, relay: Relay, device: DeviceKeys
    ) -> None:
        """A relayd down message opens in pyhpke with the device's private key and verifies."""
        plain = payload.down_payload(device.device, 5, 1_790_000_000_000, MESSAGE_ID, "acme",
                                     "message", {"text": "from relayd"})
        body = envelope.seal(plain, direction="down", kid=device.device, kem=Kem.X25519,
                             recipient=device.enc_private.public_key(), signer=relay.signing)

        opened = _pyhpke_open(device.enc_private_raw, b"relayd/v1 down " + b"phone-1", body)
        signature, got = opened[:64], opened[64:]
        relay.signing.public_key().verify(signature, b"relayd/v1 down\n" + got)
        assert got == plain

    def test_up_message_sealed_by_device_client_opens_in_pyhpke(
        self, relay: Relay, device: DeviceKeys
    ) -> None:
        """DeviceKeys.seal output opens in pyhpke with the relay's private key."""
        plain = device.payload("acme", "typing_start")
        body = device.seal(relay.public, plain)
        opened = _pyhpke_open(relay.private_raw, b"relayd/v1 up r2026-11", body)
        device.sign_private.public_key().verify(opened[:64], b"relayd/v1 up\n" + opened[64:])
        assert opened[64:] == plain
