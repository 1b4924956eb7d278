"""Primitives and encodings (relayd.crypto)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.crypto import Kem, b64d, b64e, fingerprint, raw_public
from tests.unit.helpers import FAST


class TestBase64url:
    @FAST
    @given(data=st.binary(max_size=200))
    def test_round_trip_without_padding(self, data: bytes) -> None:
        """b64e writes unpadded base64url that b64d reads back exactly."""
        text = b64e(data)
        assert "=" not in text
        assert not set(text) & {"+", "/"}
        assert b64d(text) == data

    def test_padding_optional(self) -> None:
        """b64d accepts padded and unpadded text alike."""
        assert b64d("AQ") == b64d("AQ==") == b"\x01"

    @pytest.mark.parametrize("text", ["é", "A", "AQ=A", 5, None, b"AQ"], ids=repr)
    def test_rejects_non_base64url(self, text: object) -> None:
        """Non-ASCII, non-str and impossible lengths raise ValueError."""
        with pytest.raises(ValueError, match="not base64url"):
            b64d(text)  # type: ignore[arg-type]

    @pytest.mark.parametrize("text", ["AA==$$$$", "A+/A", "AQ AQ"], ids=repr)
    def test_rejects_characters_outside_the_alphabet(self, text: str) -> None:
        """Only A-Z a-z 0-9 - _ (and trailing '=') are base64url."""
        with pytest.raises(ValueError, match="not base64url"):
            b64d(text)


class TestKem:
    def test_enc_lengths(self) -> None:
        """enc is 32 bytes for X25519 and 1120 for MLKEM768_X25519."""
        assert Kem.X25519.enc_length == 32
        assert Kem.MLKEM768_X25519.enc_length == 1088 + 32

    @pytest.mark.parametrize(("kem", "private_size", "public_size"),
                             [(Kem.X25519, 32, 32), (Kem.MLKEM768_X25519, 96, 1216)])
    def test_raw_key_sizes_and_round_trip(self, kem: Kem, private_size: int,
                                          public_size: int) -> None:
        """Generated raw keys have the documented sizes and decode back to working keys."""
        _, raw = kem.generate()
        public = raw_public(kem, raw)
        assert (len(raw), len(public)) == (private_size, public_size)
        sealed = kem.suite.encrypt(b"x", kem.public_key(public), info=b"i")
        assert kem.suite.decrypt(sealed, kem.private_key(raw), info=b"i") == b"x"

    def test_private_key_is_deterministic_from_raw(self) -> None:
        """Decoding one raw hybrid private key twice gives the same public key."""
        _, raw = Kem.MLKEM768_X25519.generate()
        assert raw_public(Kem.MLKEM768_X25519, raw) == raw_public(Kem.MLKEM768_X25519, raw)

    @pytest.mark.parametrize(("kem", "size"), [(Kem.X25519, 31), (Kem.X25519, 33),
                                               (Kem.MLKEM768_X25519, 32),
                                               (Kem.MLKEM768_X25519, 1215)])
    def test_public_key_wrong_length(self, kem: Kem, size: int) -> None:
        """A raw public key of the wrong length is a ValueError."""
        with pytest.raises(ValueError):  # noqa: PT011 - the binding's message varies
            kem.public_key(bytes(size))

    @pytest.mark.parametrize(("kem", "size"), [(Kem.X25519, 31), (Kem.MLKEM768_X25519, 95)])
    def test_private_key_wrong_length(self, kem: Kem, size: int) -> None:
        """A raw private key of the wrong length is a ValueError."""
        with pytest.raises(ValueError):  # noqa: PT011 - the binding's message varies
            kem.private_key(bytes(size))


class TestFingerprint:
    def test_short_stable_and_distinct(self) -> None:
        """A fingerprint is 22 base64url characters, stable, and differs between keys."""
        assert fingerprint(b"a") == fingerprint(b"a")
        assert len(fingerprint(b"a")) == 22
        assert fingerprint(b"a") != fingerprint(b"b")
