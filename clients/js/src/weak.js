// The relay's public keys, checked before the SDK seals to them or trusts a signature
// under them: the same checks as relayd.crypto, which refuses these keys wherever they
// enter (docs/protocol.md section 1, "Devices"). A key that decodes but must never be used:
// - X25519 (and the X25519 half of MLKEM768_X25519): a low-order point, whose shared
//   secret anyone can compute (all zero, 1, p-1 and the two points of order 8), or a
//   non-canonical encoding (u >= p, the top bit set among them);
// - the ML-KEM-768 half: a coefficient of t not below q (FIPS 203's modulus check), or a
//   vector t whose every coefficient, out of the NTT domain, is within q/4 of zero (a
//   ciphertext to it shows the shared secret; t = 0 is the extreme case);
// - Ed25519: a point of small order (the identity, all zero: a signature verifies without
//   any secret), a non-canonical y (y >= p), or no point of the curve.
// These are checks on public values, not crypto: the primitives stay in the packages.

const P = 2n ** 255n - 19n;
const Q = 3329;
const MLKEM768_PUBLIC = 1184;
const MLKEM768_T = 1152; // the encoded t; the last 32 bytes of the ML-KEM key are rho
/** 17^BitRev7(i) mod q (FIPS 203), for the inverse NTT. */
const ZETAS = Array.from({ length: 128 }, (_, i) => Number(power(17n, BigInt(parseInt(i.toString(2).padStart(7, "0").split("").reverse().join(""), 2)), BigInt(Q))));

/** RFC 7748's low-order u-coordinates; libsodium's blocklist has them and p, p+1. */
export const X25519_LOW_ORDER = Object.freeze([
  0n, 1n, P - 1n,
  325606250916557431795983626356110631294008115727848805560023387167927233504n,
  39382357235489614581723060781553021112529911719440698176882885853963445705823n,
]);
const Y8 = 2707385501144840649318225287225658788936804267575313519463743609750303402022n;
/** The y-coordinates of edwards25519's eight points of small order (libsodium's list). */
export const ED25519_SMALL_ORDER_Y = Object.freeze([1n, P - 1n, 0n, Y8, P - Y8]);
const D = mod(-121665n * inverse(121666n));
const SQRT_M1 = power(2n, (P - 1n) / 4n, P);

/** A public key that decodes but must never be used; `reason` says which check failed. */
export class WeakKeyError extends TypeError {
  /** @param {string} reason */
  constructor(reason) {
    super(reason);
    this.name = "WeakKeyError";
  }
}

/**
 * WeakKeyError unless `raw` is a usable X25519 public key (the caller checked its length).
 * @param {Uint8Array} raw 32 bytes
 */
export function checkX25519(raw) {
  const u = littleEndian(raw);
  if (u >= P) throw new WeakKeyError("the X25519 public key is not canonical (u >= 2^255-19)");
  if (X25519_LOW_ORDER.includes(u)) throw new WeakKeyError("the X25519 public key is a low-order point: anyone could compute what is sealed to it");
}

/**
 * WeakKeyError unless `raw` is a usable MLKEM768_X25519 public key: the 1184-byte ML-KEM-768
 * encapsulation key, then the X25519 key.
 * @param {Uint8Array} raw 1216 bytes
 */
export function checkMlkem768X25519(raw) {
  checkX25519(raw.subarray(MLKEM768_PUBLIC));
  const t = decode12(raw.subarray(0, MLKEM768_T));
  if (t.some((c) => c >= Q)) throw new WeakKeyError("the ML-KEM-768 encapsulation key fails FIPS 203's modulus check (a coefficient is not below q = 3329)");
  const small = [0, 256, 512].every((k) => inverseNtt(t.slice(k, k + 256)).every((c) => Math.min(c, Q - c) <= Math.floor(Q / 4)));
  if (small) throw new WeakKeyError("the ML-KEM-768 encapsulation key's vector t is zero or small: anyone could compute what is sealed to it");
}

/**
 * WeakKeyError unless `raw` is a usable Ed25519 public key (RFC 8032 section 5.1.3).
 * @param {Uint8Array} raw 32 bytes
 */
export function checkEd25519(raw) {
  const y = littleEndian(raw) & (2n ** 255n - 1n); // bit 255 is the sign of x
  if (y >= P) throw new WeakKeyError("the Ed25519 public key is not canonical (y >= 2^255-19)");
  if (ED25519_SMALL_ORDER_Y.includes(y)) throw new WeakKeyError("the Ed25519 public key is a point of small order: a signature could verify without a key");
  const u = mod(y * y - 1n);
  const v = mod(D * y * y + 1n);
  let x = mod(u * power(v, 3n, P) * power(mod(u * power(v, 7n, P)), (P - 5n) / 8n, P));
  if (mod(v * x * x) === mod(-u)) x = mod(x * SQRT_M1);
  if (mod(v * x * x) !== u) throw new WeakKeyError("the Ed25519 public key is not a point of edwards25519");
}

/** @param {Uint8Array} bytes */
function littleEndian(bytes) {
  let value = 0n;
  for (let i = bytes.length - 1; i >= 0; i -= 1) value = (value << 8n) | BigInt(bytes[i]);
  return value;
}

/**
 * ByteDecode12: two 12-bit coefficients in each 3 bytes.
 * @param {Uint8Array} bytes
 */
function decode12(bytes) {
  const out = [];
  for (let i = 0; i < bytes.length; i += 3) {
    out.push(bytes[i] | ((bytes[i + 1] & 0x0f) << 8), (bytes[i + 1] >> 4) | (bytes[i + 2] << 4));
  }
  return out;
}

/**
 * FIPS 203, Algorithm 10: a polynomial from its NTT representation.
 * @param {number[]} fHat 256 coefficients below q
 */
function inverseNtt(fHat) {
  const f = [...fHat];
  let i = 127;
  for (let length = 2; length <= 128; length *= 2) {
    for (let start = 0; start < 256; start += 2 * length) {
      const zeta = ZETAS[i];
      i -= 1;
      for (let j = start; j < start + length; j += 1) {
        const t = f[j];
        f[j] = (t + f[j + length]) % Q;
        f[j + length] = (zeta * (((f[j + length] - t) % Q) + Q)) % Q;
      }
    }
  }
  return f.map((c) => (c * 3303) % Q); // 3303 = 128^-1 mod q
}

/** @param {bigint} a */
function mod(a) {
  const r = a % P;
  return r < 0n ? r + P : r;
}

/** @param {bigint} a */
function inverse(a) {
  return power(a, P - 2n, P);
}

/**
 * @param {bigint} base
 * @param {bigint} exponent
 * @param {bigint} modulus
 */
function power(base, exponent, modulus) {
  let result = 1n;
  let b = base % modulus;
  for (let e = exponent; e > 0n; e >>= 1n) {
    if (e & 1n) result = (result * b) % modulus;
    b = (b * b) % modulus;
  }
  return result;
}
