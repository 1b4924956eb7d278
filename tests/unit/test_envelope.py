"""Sealing and opening (relayd.envelope, DeviceKeys): round trips and tampering."""

from __future__ import annotations

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given
from hypothesis import strategies as st

from relayd import envelope, payload
from relayd.client.device import DeviceKeys
from relayd.crypto import Kem
from relayd.errors import EnvelopeError
from tests.unit.helpers import DEVICES, FAST, RELAYS, Relay

KEMS = list(Kem)
MESSAGE_ID = "6f1c2f5e-8d0b-4a0e-9d7e-0a8f4c2b1e3d"
TS = 1_790_000_000_000


def _up_payload(kem: Kem, kind: str = "message") -> bytes:
    """A fixed-length up payload, so hypothesis draws the same ranges every run."""
    body = {"text": "hi"} if kind == "message" else {}
    return DEVICES[kem].payload("acme", kind, body, seq=1, message_id=MESSAGE_ID, ts=TS)


def _seal_up(kem: Kem, body: bytes | None = None) -> tuple[bytes, bytes]:
    """(payload, AMQP body) of an up message from the device to the relay for `kem`."""
    device, relay = DEVICES[kem], RELAYS[kem]
    plain = body or _up_payload(kem)
    return plain, device.seal(relay.public, plain)


def _open_up(kem: Kem, body: bytes, *, kid: str | None = None,
             direction: envelope.Direction = "up") -> tuple[bytes, bytes]:
    relay = RELAYS[kem]
    return envelope.open_sealed(body, direction=direction, kid=kid or relay.kid, kem=kem,
                                private=relay.private)


def _device_verifier(kem: Kem) -> ed25519.Ed25519PublicKey:
    return ed25519.Ed25519PublicKey.from_public_bytes(DEVICES[kem].sign_public)


def _encrypt_plain(kem: Kem, plain: bytes, info: bytes) -> bytes:
    """HPKE-encrypt `plain` to the relay's key directly, bypassing envelope.seal."""
    return kem.suite.encrypt(plain, RELAYS[kem].private.public_key(), info=info)


def _flip(data: bytes, index: int, mask: int) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1:]


@pytest.mark.parametrize("kem", KEMS)
class TestRoundTrip:
    def test_up_sealed_by_device_opens_and_verifies_at_relay(self, kem: Kem) -> None:
        """A device's up message opens under the relay's key and verifies with the device's."""
        plain, body = _seal_up(kem)
        signature, opened = _open_up(kem, body)
        envelope.verify(signature, opened, direction="up", signer=_device_verifier(kem))
        assert opened == plain
        assert len(signature) == envelope.SIGNATURE_BYTES

    def test_body_is_enc_then_ciphertext(self, kem: Kem) -> None:
        """The AMQP body is enc || ct: plaintext + 16-byte tag after enc_length bytes."""
        plain, body = _seal_up(kem)
        assert len(body) == kem.enc_length + envelope.SIGNATURE_BYTES + len(plain) + 16

    def test_down_sealed_by_relay_opens_at_device(self, kem: Kem) -> None:
        """A relay-signed down message sealed to the device id opens with DeviceKeys.open."""
        device, relay = DEVICES[kem], RELAYS[kem]
        plain = payload.down_payload(device.device, 7, TS, MESSAGE_ID, "acme",
                                     "message", {"text": "welcome"})
        body = envelope.seal(plain, direction="down", kid=device.device, kem=kem,
                             recipient=device.enc_private.public_key(), signer=relay.signing)
        message = device.open(relay.public, body)
        assert message == orjson.loads(plain)

    def test_each_seal_is_fresh(self, kem: Kem) -> None:
        """Sealing the same payload twice gives different bodies (a new ephemeral key)."""
        plain, first = _seal_up(kem)
        _, second = _seal_up(kem, plain)
        assert first != second
        assert _open_up(kem, first)[1] == _open_up(kem, second)[1] == plain


@pytest.mark.parametrize("kem", KEMS)
class TestTampering:
    @FAST
    @given(data=st.data())
    def test_any_changed_enc_byte_fails_to_decrypt(self, kem: Kem, data: st.DataObject) -> None:
        """Changing any one byte of enc makes HPKE open fail with decrypt_failed."""
        _, body = _seal_up(kem)
        index = data.draw(st.integers(0, kem.enc_length - 1), label="index")
        mask = data.draw(st.integers(1, 255), label="mask")
        with pytest.raises(EnvelopeError) as caught:
            _open_up(kem, _flip(body, index, mask))
        assert caught.value.reason == "decrypt_failed"

    @FAST
    @given(data=st.data())
    def test_any_changed_ciphertext_byte_fails_to_decrypt(
        self, kem: Kem, data: st.DataObject
    ) -> None:
        """Changing any one byte of the ciphertext (tag included) fails with decrypt_failed."""
        _, body = _seal_up(kem)
        index = data.draw(st.integers(kem.enc_length, len(body) - 1), label="index")
        mask = data.draw(st.integers(1, 255), label="mask")
        with pytest.raises(EnvelopeError) as caught:
            _open_up(kem, _flip(body, index, mask))
        assert caught.value.reason == "decrypt_failed"

    @FAST
    @given(data=st.data())
    def test_any_changed_signature_or_payload_byte_fails_to_verify(
        self, kem: Kem, data: st.DataObject
    ) -> None:
        """Changing any byte of signature || payload before encryption fails bad_signature."""
        device, relay = DEVICES[kem], RELAYS[kem]
        plain = _up_payload(kem)
        signed = device.sign_private.sign(envelope.signed_bytes("up", plain)) + plain
        index = data.draw(st.integers(0, len(signed) - 1), label="index")
        mask = data.draw(st.integers(1, 255), label="mask")
        body = _encrypt_plain(kem, _flip(signed, index, mask), envelope.info("up", relay.kid))
        signature, opened = _open_up(kem, body)  # decryption itself succeeds
        with pytest.raises(EnvelopeError) as caught:
            envelope.verify(signature, opened, direction="up", signer=_device_verifier(kem))
        assert caught.value.reason == "bad_signature"

    def test_unchanged_hand_built_plaintext_verifies(self, kem: Kem) -> None:
        """The hand-built signature || payload used above verifies when left intact."""
        device, relay = DEVICES[kem], RELAYS[kem]
        plain = _up_payload(kem, "read")
        signed = device.sign_private.sign(envelope.signed_bytes("up", plain)) + plain
        signature, opened = _open_up(kem, _encrypt_plain(kem, signed,
                                                         envelope.info("up", relay.kid)))
        envelope.verify(signature, opened, direction="up", signer=_device_verifier(kem))
        assert opened == plain

    def test_wrong_kid_fails_to_decrypt(self, kem: Kem) -> None:
        """A body sealed to one kid does not open under another kid's info."""
        _, body = _seal_up(kem)
        with pytest.raises(EnvelopeError) as caught:
            _open_up(kem, body, kid="r2025-01")
        assert caught.value.reason == "decrypt_failed"

    def test_wrong_recipient_key_fails_to_decrypt(self, kem: Kem) -> None:
        """A body sealed to the relay does not open with another key of the same KEM."""
        _, body = _seal_up(kem)
        other = Relay.generate(kem)
        with pytest.raises(EnvelopeError) as caught:
            envelope.open_sealed(body, direction="up", kid=other.kid, kem=kem,
                                 private=other.private)
        assert caught.value.reason == "decrypt_failed"

    def test_wrong_direction_fails_to_decrypt(self, kem: Kem) -> None:
        """An up body does not open as a down body (the direction is in the info)."""
        _, body = _seal_up(kem)
        with pytest.raises(EnvelopeError) as caught:
            _open_up(kem, body, direction="down")
        assert caught.value.reason == "decrypt_failed"

    @pytest.mark.parametrize("info", [b"", b"relayd/v1 up", b"relayd/v1 up  r2026-11",
                                      b"relayd/v2 up r2026-11", b"relayd/v1 down r2026-11"])
    def test_wrong_info_fails_to_decrypt(self, kem: Kem, info: bytes) -> None:
        """A body encrypted with any info but the contract's does not open."""
        device, relay = DEVICES[kem], RELAYS[kem]
        plain = _up_payload(kem, "read")
        signed = device.sign_private.sign(envelope.signed_bytes("up", plain)) + plain
        assert info != envelope.info("up", relay.kid)
        with pytest.raises(EnvelopeError) as caught:
            _open_up(kem, _encrypt_plain(kem, signed, info))
        assert caught.value.reason == "decrypt_failed"

    def test_signature_for_other_direction_fails_to_verify(self, kem: Kem) -> None:
        """A signature made over the down prefix does not verify as an up message."""
        device, relay = DEVICES[kem], RELAYS[kem]
        plain = _up_payload(kem, "read")
        signed = device.sign_private.sign(envelope.signed_bytes("down", plain)) + plain
        signature, opened = _open_up(kem, _encrypt_plain(kem, signed,
                                                         envelope.info("up", relay.kid)))
        with pytest.raises(EnvelopeError) as caught:
            envelope.verify(signature, opened, direction="up", signer=_device_verifier(kem))
        assert caught.value.reason == "bad_signature"

    def test_other_signer_fails_to_verify(self, kem: Kem) -> None:
        """A payload signed by one device does not verify with another device's key."""
        _, body = _seal_up(kem)
        signature, opened = _open_up(kem, body)
        stranger = ed25519.Ed25519PrivateKey.generate().public_key()
        with pytest.raises(EnvelopeError) as caught:
            envelope.verify(signature, opened, direction="up", signer=stranger)
        assert caught.value.reason == "bad_signature"

    def test_body_no_longer_than_enc_is_malformed(self, kem: Kem) -> None:
        """A body of at most enc_length bytes is rejected as malformed before HPKE."""
        _, body = _seal_up(kem)
        with pytest.raises(EnvelopeError) as caught:
            _open_up(kem, body[:kem.enc_length])
        assert caught.value.reason == "malformed"

    def test_truncated_body_fails_to_decrypt(self, kem: Kem) -> None:
        """A body missing its last byte fails to decrypt."""
        _, body = _seal_up(kem)
        with pytest.raises(EnvelopeError) as caught:
            _open_up(kem, body[:-1])
        assert caught.value.reason == "decrypt_failed"

    def test_plaintext_with_no_payload_is_malformed(self, kem: Kem) -> None:
        """A plaintext of only a signature (64 bytes) is rejected as malformed."""
        relay = RELAYS[kem]
        body = _encrypt_plain(kem, bytes(64), envelope.info("up", relay.kid))
        with pytest.raises(EnvelopeError) as caught:
            _open_up(kem, body)
        assert caught.value.reason == "malformed"


class TestCrossKem:
    def test_x25519_body_does_not_open_under_hybrid_key(self) -> None:
        """A body sealed to an X25519 key is rejected by a MLKEM768_X25519 key."""
        _, body = _seal_up(Kem.X25519)
        hybrid = RELAYS[Kem.MLKEM768_X25519]
        with pytest.raises(EnvelopeError) as caught:
            envelope.open_sealed(body, direction="up", kid=hybrid.kid,
                                 kem=Kem.MLKEM768_X25519, private=hybrid.private)
        assert caught.value.reason in {"malformed", "decrypt_failed"}

    def test_hybrid_body_does_not_open_under_x25519_key(self) -> None:
        """A body sealed to a MLKEM768_X25519 key fails to decrypt under an X25519 key."""
        _, body = _seal_up(Kem.MLKEM768_X25519)
        classic = RELAYS[Kem.X25519]
        with pytest.raises(EnvelopeError) as caught:
            envelope.open_sealed(body, direction="up", kid=classic.kid, kem=Kem.X25519,
                                 private=classic.private)
        assert caught.value.reason == "decrypt_failed"


@pytest.mark.parametrize("kem", KEMS)
class TestDeviceOpen:
    def _seal_down(self, kem: Kem, plain: bytes, *, kid: str | None = None,
                   signer: ed25519.Ed25519PrivateKey | None = None) -> bytes:
        device, relay = DEVICES[kem], RELAYS[kem]
        return envelope.seal(plain, direction="down", kid=kid or device.device, kem=kem,
                             recipient=device.enc_private.public_key(),
                             signer=signer or relay.signing)

    def test_message_for_another_device_is_refused(self, kem: Kem) -> None:
        """A well-sealed down payload naming another device is rejected as malformed."""
        plain = payload.down_payload("someone-else", 1, 1, MESSAGE_ID,
                                     "acme", "read", {})
        with pytest.raises(EnvelopeError) as caught:
            DEVICES[kem].open(RELAYS[kem].public, self._seal_down(kem, plain))
        assert caught.value.reason == "malformed"

    def test_message_not_signed_by_relay_is_refused(self, kem: Kem) -> None:
        """A down message signed by anyone but the relay fails bad_signature."""
        device = DEVICES[kem]
        plain = payload.down_payload(device.device, 1, 1, MESSAGE_ID,
                                     "acme", "read", {})
        body = self._seal_down(kem, plain, signer=ed25519.Ed25519PrivateKey.generate())
        with pytest.raises(EnvelopeError) as caught:
            device.open(RELAYS[kem].public, body)
        assert caught.value.reason == "bad_signature"

    def test_message_sealed_under_other_kid_is_refused(self, kem: Kem) -> None:
        """A down message sealed with another device id as kid fails to decrypt."""
        device = DEVICES[kem]
        plain = payload.down_payload(device.device, 1, 1, MESSAGE_ID,
                                     "acme", "read", {})
        with pytest.raises(EnvelopeError) as caught:
            device.open(RELAYS[kem].public, self._seal_down(kem, plain, kid="other-device"))
        assert caught.value.reason == "decrypt_failed"

    def test_up_message_does_not_open_as_down(self, kem: Kem) -> None:
        """A device cannot be fed an up message as if it came down (direction binding)."""
        device = DEVICES[kem]
        twin = DeviceKeys(device.device, kem, device.enc_private_raw, device.sign_private)
        plain = payload.down_payload(device.device, 1, 1, MESSAGE_ID,
                                     "acme", "read", {})
        body = envelope.seal(plain, direction="up", kid=device.device, kem=kem,
                             recipient=device.enc_private.public_key(),
                             signer=RELAYS[kem].signing)
        with pytest.raises(EnvelopeError) as caught:
            twin.open(RELAYS[kem].public, body)
        assert caught.value.reason == "decrypt_failed"
