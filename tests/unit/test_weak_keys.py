"""Public keys are checked where they enter (relayd.crypto's one function per key kind).

Each check is compared with an oracle that does not share its method: X25519 against
OpenSSL's own refusal of an all-zero shared secret, Ed25519 against point arithmetic
written here ([8]P is the identity exactly for the points of small order), ML-KEM against
FIPS 203's modulus check written out, and against an attack that reads the shared secret
off a real ciphertext when t is small. The published lists (libsodium's blocklists, RFC
7748's low-order points) are tested by name.
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519
from hypothesis import example, given
from hypothesis import strategies as st

from relayd.client.device import RelayPublic
from relayd.crypto import (
    Kem,
    WeakKeyError,
    b64e,
    ed25519_public,
    mlkem768_x25519_public,
    x25519_public,
)
from tests.unit.helpers import FAST, RELAYS, SMALL

P = 2**255 - 19
Q = 3329  # ML-KEM's modulus


def _le(value: int) -> bytes:
    return value.to_bytes(32, "little")


# libsodium, crypto_scalarmult/curve25519/ref10/x25519_ref10.c, has_small_order(): these
# seven, compared with bit 255 ignored. RFC 7748 section 7 names the same points: 0, 1,
# p-1 and the two of order 8 (u = 3256… and 3938…), plus their non-canonical forms.
LIBSODIUM_X25519_BLOCKLIST = [
    bytes(32),
    _le(1),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    _le(P - 1),
    _le(P),
    _le(P + 1),
]
# libsodium, crypto_core/ed25519/ref10/ed25519_ref10.c, ge25519_has_small_order(): the
# y-coordinates of the eight small-order points and the non-canonical p and p+1, with the
# sign bit ignored.
LIBSODIUM_ED25519_BLOCKLIST = [
    bytes(32),
    _le(1),
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    _le(P - 1),
    _le(P),
    _le(P + 1),
]


def _with_top_bit(raw: bytes) -> bytes:
    return raw[:31] + bytes([raw[31] | 0x80])


def _x25519_is_low_order(raw: bytes) -> bool:
    """The oracle: OpenSSL refuses a shared secret of zero, which a clamped (so a multiple
    of 8) private key gives with exactly the points of order 1, 2, 4 and 8."""
    try:
        ORACLE_X25519.exchange(x25519.X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return True
    return False


ORACLE_X25519 = x25519.X25519PrivateKey.generate()
D = -121665 * pow(121666, -1, P) % P


def _ed_decode(raw: bytes) -> tuple[int, int] | None:
    """RFC 8032 5.1.3, for the oracle: the point, or None when y >= p or off the curve."""
    y, sign = int.from_bytes(raw, "little") & (2**255 - 1), raw[31] >> 7
    if y >= P:
        return None
    xx = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
    if pow(xx, (P - 1) // 2, P) not in (0, 1):  # Euler: no square root
        return None
    x = pow(xx, (P + 3) // 8, P)
    if x * x % P != xx:
        x = x * pow(2, (P - 1) // 4, P) % P
    if x % 2 != sign:
        x = P - x
    return x % P, y


def _ed_add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    return ((x1 * y2 + x2 * y1) * pow(1 + t, -1, P) % P,
            (y1 * y2 + x1 * x2) * pow(1 - t, -1, P) % P)


def _ed_small_order(point: tuple[int, int]) -> bool:
    """[8]P is the identity (0, 1): three doublings."""
    for _ in range(3):
        point = _ed_add(point, point)
    return point == (0, 1)


def _mlkem_modulus_ok(ek: bytes) -> bool:
    """FIPS 203 section 7.2's modulus check, written out: every 12-bit coefficient < q."""
    t = int.from_bytes(ek[:1152], "little")
    return all((t >> (12 * i)) & 0xFFF < Q for i in range(768))


def _with_coefficient(ek: bytes, index: int, value: int) -> bytes:
    t = int.from_bytes(ek[:1152], "little")
    t = t & ~(0xFFF << (12 * index)) | (value << (12 * index))
    return t.to_bytes(1152, "little") + ek[1152:]


# --- ML-KEM-768 written out from FIPS 203, to build keys and to attack them -------------

ZETAS = [pow(17, int(format(i, "07b")[::-1], 2), Q) for i in range(128)]  # 17^BitRev7(i)


def _ntt(f: list[int]) -> list[int]:
    """FIPS 203, Algorithm 9."""
    f, i, length = list(f), 1, 128
    while length >= 2:
        for start in range(0, 256, 2 * length):
            zeta, i = ZETAS[i], i + 1
            for j in range(start, start + length):
                t = zeta * f[j + length] % Q
                f[j + length], f[j] = (f[j] - t) % Q, (f[j] + t) % Q
        length //= 2
    return f


def _ek_of(t: list[list[int]], rho: bytes) -> bytes:
    """The encapsulation key whose vector is `t` (three polynomials, coefficients mod q):
    ByteEncode12 of NTT(t), then rho."""
    coefficients = [c for poly in t for c in _ntt([c % Q for c in poly])]
    return sum(c << (12 * i) for i, c in enumerate(coefficients)).to_bytes(1152, "little") + rho


def _secret_from_ciphertext(ek: bytes, ciphertext: bytes) -> bytes:
    """The attack on a small t, with no private key: v = t.r + e2 + round(q/2).m, so m is
    Compress1 of Decompress4(c2), and the shared secret K is G(m || H(ek))[:32]."""
    c2 = int.from_bytes(ciphertext[960:], "little")  # du = 10 for c1, dv = 4 for c2
    v = [((c2 >> (4 * k)) & 0xF) * Q // 16 for k in range(256)]  # ~Decompress4
    bits = [round(2 * x / Q) % 2 for x in v]
    m = sum(bit << k for k, bit in enumerate(bits)).to_bytes(32, "little")
    return hashlib.sha3_512(m + hashlib.sha3_256(ek).digest()).digest()[:32]


MLKEM_EK = mlkem.MLKEM768PrivateKey.generate().public_key().public_bytes_raw()
X25519_OK = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()


class TestX25519:
    @pytest.mark.parametrize("raw", LIBSODIUM_X25519_BLOCKLIST, ids=lambda r: r.hex()[:8])
    def test_libsodium_blocklist_refused_with_either_top_bit(self, raw: bytes) -> None:
        """Every entry of libsodium's blocklist is refused, as is its top-bit-set twin."""
        for encoding in (raw, _with_top_bit(raw)):
            with pytest.raises(WeakKeyError):
                x25519_public(encoding)

    def test_all_zero_names_what_is_wrong(self) -> None:
        """The all-zero key is refused with a message that says it is low order."""
        with pytest.raises(WeakKeyError, match="low-order"):
            x25519_public(bytes(32))

    @FAST
    @given(raw=st.one_of(
        st.binary(min_size=32, max_size=32),
        st.sampled_from(LIBSODIUM_X25519_BLOCKLIST),
        st.integers(P - 40, 2**256 - 1).map(lambda u: u.to_bytes(32, "little")),
    ))
    @example(raw=bytes(32))
    def test_refused_exactly_when_low_order_or_not_canonical(self, raw: bytes) -> None:
        """A key is refused iff u >= p or OpenSSL gives a zero shared secret with it."""
        bad = int.from_bytes(raw, "little") >= P or _x25519_is_low_order(raw)
        try:
            x25519_public(raw)
        except WeakKeyError:
            assert bad
        else:
            assert not bad

    @FAST
    @given(seed=st.binary(min_size=32, max_size=32))
    def test_every_generated_key_is_accepted(self, seed: bytes) -> None:
        """The public key of any private key passes: the check refuses no honest device."""
        public = x25519.X25519PrivateKey.from_private_bytes(seed).public_key()
        assert x25519_public(public.public_bytes_raw()) is not None

    @pytest.mark.parametrize("size", [0, 31, 33])
    def test_wrong_length(self, size: int) -> None:
        """Anything but 32 bytes is a ValueError, not a weak key."""
        with pytest.raises(ValueError, match="32 bytes"):
            x25519_public(bytes(size))


class TestEd25519:
    @pytest.mark.parametrize("raw", LIBSODIUM_ED25519_BLOCKLIST, ids=lambda r: r.hex()[:8])
    def test_libsodium_blocklist_refused_with_either_sign(self, raw: bytes) -> None:
        """Every entry of libsodium's blocklist is refused, with the sign bit clear or set."""
        for encoding in (raw, _with_top_bit(raw)):
            with pytest.raises(WeakKeyError):
                ed25519_public(encoding)

    def test_the_identity_verifies_a_forgery_that_the_check_prevents(self) -> None:
        """Under the identity point, (R = identity, S = 0) verifies on any message without a
        secret: the attack is real, and ed25519_public refuses that key."""
        identity = _le(1)
        forged = identity + bytes(32)
        key = ed25519.Ed25519PublicKey.from_public_bytes(identity)
        for message in (b"relayd/v1 up\n{}", b"anything at all"):
            key.verify(forged, message)  # no InvalidSignature: cryptography accepts it
        with pytest.raises(WeakKeyError, match="small order"):
            ed25519_public(identity)

    @FAST
    @given(raw=st.one_of(
        st.binary(min_size=32, max_size=32),
        st.sampled_from(LIBSODIUM_ED25519_BLOCKLIST).flatmap(
            lambda r: st.sampled_from([r, _with_top_bit(r)])),
        st.integers(P - 40, 2**255 - 1).map(lambda y: y.to_bytes(32, "little")),
    ))
    def test_refused_exactly_when_off_curve_small_order_or_not_canonical(self,
                                                                         raw: bytes) -> None:
        """A key is refused iff it does not decode canonically to a point, or [8]P = 0."""
        point = _ed_decode(raw)
        x_zero_negative = point is not None and point[0] == 0 and raw[31] >> 7
        bad = point is None or bool(x_zero_negative) or _ed_small_order(point)
        try:
            ed25519_public(raw)
        except WeakKeyError:
            assert bad
        else:
            assert not bad

    @FAST
    @given(seed=st.binary(min_size=32, max_size=32))
    def test_every_generated_key_is_accepted_and_verifies(self, seed: bytes) -> None:
        """The public key of any private key passes and verifies that key's signatures."""
        private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        key = ed25519_public(private.public_key().public_bytes_raw())
        key.verify(private.sign(b"m"), b"m")
        with pytest.raises(InvalidSignature):
            key.verify(bytes(64), b"m")

    @pytest.mark.parametrize("size", [0, 31, 33])
    def test_wrong_length(self, size: int) -> None:
        """Anything but 32 bytes is a ValueError."""
        with pytest.raises(ValueError, match="32 bytes"):
            ed25519_public(bytes(size))


class TestMlkem768X25519:
    def test_a_generated_key_is_accepted(self) -> None:
        """A real hybrid public key passes."""
        assert mlkem768_x25519_public(MLKEM_EK + X25519_OK) is not None

    @pytest.mark.parametrize("raw", LIBSODIUM_X25519_BLOCKLIST, ids=lambda r: r.hex()[:8])
    def test_low_order_x25519_half_refused(self, raw: bytes) -> None:
        """The X25519 half is checked as an X25519 key is."""
        with pytest.raises(WeakKeyError, match="X25519"):
            mlkem768_x25519_public(MLKEM_EK + raw)

    def test_zero_vector_refused(self) -> None:
        """An encapsulation key whose t is zero (ciphertexts give the secret away) is
        refused, whatever its seed rho."""
        with pytest.raises(WeakKeyError, match="zero"):
            mlkem768_x25519_public(bytes(1152) + MLKEM_EK[1152:] + X25519_OK)

    @SMALL
    @given(bound=st.integers(0, 3), data=st.data())
    @example(bound=0, data=None)  # t = 0
    def test_a_small_t_gives_the_secret_away_and_is_refused(self, bound: int,
                                                           data: st.DataObject | None) -> None:
        """Any t with small coefficients (t = 0 among them; here within +-3): the real
        ML-KEM's shared secret is computed from the ciphertext alone, with no private key.
        relayd refuses every such key."""
        t = [[data.draw(st.integers(-bound, bound)) if data else 0 for _ in range(256)]
             for _ in range(3)]
        ek = _ek_of(t, bytes(range(32)))
        secret, ciphertext = mlkem.MLKEM768PublicKey.from_public_bytes(ek).encapsulate()
        assert _secret_from_ciphertext(ek, ciphertext) == secret  # the key is worthless
        with pytest.raises(WeakKeyError, match="small"):
            mlkem768_x25519_public(ek + X25519_OK)

    @SMALL
    @given(seed=st.binary(min_size=64, max_size=64))
    def test_every_generated_key_is_accepted_and_resists_the_attack(self, seed: bytes) -> None:
        """Keys made as FIPS 203 makes them pass, and the small-t attack gets nothing from
        their ciphertexts."""
        ek = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed).public_key().public_bytes_raw()
        assert mlkem768_x25519_public(ek + X25519_OK) is not None
        secret, ciphertext = mlkem.MLKEM768PublicKey.from_public_bytes(ek).encapsulate()
        assert _secret_from_ciphertext(ek, ciphertext) != secret

    @SMALL
    @given(index=st.integers(0, 767), value=st.integers(0, 4095))
    def test_refused_exactly_when_a_coefficient_is_not_below_q(self, index: int,
                                                               value: int) -> None:
        """FIPS 203's modulus check: cryptography refuses a coefficient >= q, and relayd
        says so; a coefficient below q is accepted."""
        ek = _with_coefficient(MLKEM_EK, index, value)
        if _mlkem_modulus_ok(ek):
            assert mlkem768_x25519_public(ek + X25519_OK) is not None
        else:
            with pytest.raises(WeakKeyError, match="modulus"):
                mlkem768_x25519_public(ek + X25519_OK)

    @pytest.mark.parametrize("size", [0, 1215, 1217])
    def test_wrong_length(self, size: int) -> None:
        """Anything but 1216 bytes is a ValueError."""
        with pytest.raises(ValueError, match="1216 bytes"):
            mlkem768_x25519_public(bytes(size))


class TestWhereKeysEnter:
    @pytest.mark.parametrize("kem", list(Kem))
    def test_kem_public_key_is_the_checked_decoder(self, kem: Kem) -> None:
        """Kem.public_key refuses a weak key of its kind (the path every HPKE key takes)."""
        weak = bytes(32) if kem is Kem.X25519 else MLKEM_EK + bytes(32)
        with pytest.raises(WeakKeyError):
            kem.public_key(weak)

    @pytest.mark.parametrize("field", ["enc_public_key", "sign_public_key"])
    def test_client_refuses_a_weak_relay_key(self, field: str) -> None:
        """relayd.client.RelayPublic refuses a relay JSON with a weak key in it."""
        relay = RELAYS[Kem.X25519].public
        info = {"kid": relay.kid, "kem": relay.kem.value,
                "enc_public_key": b64e(relay.enc_public_key),
                "sign_public_key": b64e(relay.sign_public_key)}
        assert RelayPublic.from_json(info) == relay
        with pytest.raises(WeakKeyError):
            RelayPublic.from_json({**info, field: b64e(_le(1))})
