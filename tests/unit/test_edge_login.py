"""The edge login signature: the contract's test vector, and one answer for every failure."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from relayd.crypto import b64d, b64e
from relayd.edge import login

PROTOCOL = Path(__file__).parents[2] / "docs" / "protocol.md"


def vector() -> dict[str, str]:
    """The rows of the login test vector table in docs/protocol.md, by item."""
    text = PROTOCOL.read_text()
    table = text[text.index("### A test vector for the login signature"):]
    table = table[:table.index("\n### ", 10)]
    return {m[1]: m[2] for m in re.finditer(r"^\| (.+?) \| `([^`]+)` \|$", table, re.M)}


class TestVector:
    def test_the_documented_signature_is_what_signing_gives(self) -> None:
        """Signing the documented nonce, edge and device with the documented key gives the
        documented bytes and signature, and the edge accepts it."""
        v = vector()
        key = ed25519.Ed25519PrivateKey.from_private_bytes(
            bytes.fromhex(v["device Ed25519 private key (hex)"]))
        nonce = bytes.fromhex(v["nonce (hex)"])
        assert b64e(key.public_key().public_bytes_raw()) == v[
            "device Ed25519 public key (base64url)"]
        assert b64e(nonce) == v["nonce as in the challenge (base64url)"]
        signed = login.message(v["edge name"], v["device id"], nonce)
        assert signed.hex() == v["signed bytes (hex), 86 bytes"]
        assert len(signed) == 86
        sig = login.sign(key, v["edge name"], v["device id"], nonce)
        assert sig.hex() == v["signature (hex)"]
        assert b64e(sig) == v["`sig` as in the login frame (base64url)"]
        verifier = login.Verifier(v["edge name"])
        assert verifier.verify(key.public_key().public_bytes_raw(), v["device id"],
                               b64e(sig), nonce)


class TestVerifier:
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    nonce = bytes(32)

    def good(self, edge: str = "edge-1", device: str = "phone") -> str:
        return b64e(login.sign(self.key, edge, device, self.nonce))

    def test_a_good_login_passes(self) -> None:
        """The device's own signature over this edge, device and nonce is accepted."""
        assert login.Verifier("edge-1").verify(self.public, "phone", self.good(), self.nonce)

    @pytest.mark.parametrize("case", ["unknown", "other_nonce", "other_edge", "other_device",
                                      "not_b64", "short", "bad_key"])
    def test_every_failure_is_false(self, case: str) -> None:
        """No device, another challenge, edge or device, a malformed signature or a broken
        registered key: each is simply False."""
        verifier = login.Verifier("edge-1")
        key: bytes | None = self.public
        sig, device, nonce = self.good(), "phone", self.nonce
        if case == "unknown":
            key = None
        elif case == "other_nonce":
            nonce = bytes([1]) * 32
        elif case == "other_edge":
            sig = self.good(edge="edge-2")
        elif case == "other_device":
            sig = self.good(device="tablet")
        elif case == "not_b64":
            sig = "!!" + sig
        elif case == "short":
            sig = b64e(b64d(sig)[:63])
        else:
            key = b"\x00" * 31
        assert verifier.verify(key, device, sig, nonce) is False

    @pytest.mark.parametrize("weak", [
        (1).to_bytes(32, "little"),  # the identity point
        bytes(32),  # all zero: a point of order 4
        bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
        (2**255 - 20).to_bytes(32, "little"),  # p - 1: order 2
    ], ids=["identity", "zero", "order-8", "order-2"])
    def test_a_weak_registered_key_never_logs_in(self, weak: bytes) -> None:
        """A device registered with a small-order key before relayd checked keys: the
        signatures that verify under such a key without any secret (R = the key's own
        small-order point or the identity, S = 0, over any bytes) do not log anyone in as
        that device, as they verify no message of its at the inbound worker."""
        verifier = login.Verifier("edge-1")
        for r in (weak, (1).to_bytes(32, "little")):
            forged = b64e(r + bytes(32))
            assert verifier.verify(weak, "phone", forged, self.nonce) is False

    def test_an_unknown_device_is_checked_against_a_dummy_key(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The work is the same with or without a device: the dummy key is checked as a
        registered key is (relayd.crypto.ed25519_public, the costlier part), then the
        signature is verified under it."""
        calls: list[str] = []
        checked = login.ed25519_public

        class Spy:
            def __init__(self, key: ed25519.Ed25519PublicKey) -> None:
                self.key = key

            def verify(self, sig: bytes, data: bytes) -> None:
                calls.append("verify")
                self.key.verify(sig, data)

        def check(raw: bytes) -> Spy:
            calls.append("check")
            return Spy(checked(raw))

        monkeypatch.setattr(login, "ed25519_public", check)
        verifier = login.Verifier("edge-1")
        work = []
        for key in (self.public, None):
            calls.clear()
            verifier.verify(key, "phone", self.good(), self.nonce)
            work.append(list(calls))
        assert work == [["check", "verify"], ["check", "verify"]]

    @pytest.mark.parametrize("name", ["", "-edge", "a b", "a\nb", "x" * 129])
    def test_bad_edge_names_are_refused(self, name: str) -> None:
        """An edge name that could not be told apart in the signed bytes is refused."""
        with pytest.raises(ValueError, match="edge name"):
            login.Verifier(name)
