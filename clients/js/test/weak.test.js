// The relay's keys are checked as relayd checks them: the published blocklists by name,
// keys made to be weak, and fast-check's keys judged both by the SDK and by relayd.crypto.

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";

import { RelayPublic, WeakKeyError, b64uDecode, b64uEncode, checkEd25519, checkMlkem768X25519, checkX25519 } from "../src/index.js";
import { noPeer, relayd } from "./peer.js";

const P = 2n ** 255n - 19n;
const Q = 3329;

/** @param {bigint} value */
function le(value) {
  const out = new Uint8Array(32);
  for (let i = 0; i < 32; i += 1) out[i] = Number((value >> BigInt(8 * i)) & 0xffn);
  return out;
}
const hex = (/** @type {string} */ text) => Uint8Array.from(text.match(/../g) ?? [], (b) => parseInt(b, 16));
/** @param {Uint8Array} raw */
const withTopBit = (raw) => Uint8Array.from(raw, (b, i) => (i === 31 ? b | 0x80 : b));

// libsodium's blocklists (x25519_ref10.c has_small_order, ed25519_ref10.c
// ge25519_has_small_order), compared there with the top bit ignored.
const X25519_BLOCKLIST = [
  le(0n), le(1n),
  hex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
  hex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
  le(P - 1n), le(P), le(P + 1n),
];
const ED25519_BLOCKLIST = [
  le(0n), le(1n),
  hex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
  hex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
  le(P - 1n), le(P), le(P + 1n),
];

/** Whether `check` takes `raw`. */
function takes(/** @type {(raw: Uint8Array) => void} */ check, /** @type {Uint8Array} */ raw) {
  try {
    check(raw);
    return true;
  } catch (error) {
    assert.ok(error instanceof WeakKeyError, String(error));
    return false;
  }
}

// FIPS 203 written out here, to build encapsulation keys with a chosen t.
const ZETAS = Array.from({ length: 128 }, (_, i) => {
  let z = 1;
  for (let k = 0; k < parseInt(i.toString(2).padStart(7, "0").split("").reverse().join(""), 2); k += 1) z = (z * 17) % Q;
  return z;
});
/** FIPS 203, Algorithm 9. @param {number[]} poly */
function ntt(poly) {
  const f = poly.map((c) => ((c % Q) + Q) % Q);
  let i = 1;
  for (let length = 128; length >= 2; length /= 2) {
    for (let start = 0; start < 256; start += 2 * length) {
      const zeta = ZETAS[i++];
      for (let j = start; j < start + length; j += 1) {
        const t = (zeta * f[j + length]) % Q;
        f[j + length] = (f[j] - t + Q) % Q;
        f[j] = (f[j] + t) % Q;
      }
    }
  }
  return f;
}
/** ByteEncode12 of the coefficients, then rho. @param {number[]} coefficients */
function ekOf(coefficients, rho = new Uint8Array(32).fill(7)) {
  const out = new Uint8Array(1184);
  for (let k = 0; k < coefficients.length; k += 2) {
    const [a, b] = [coefficients[k], coefficients[k + 1]];
    out.set([a & 0xff, (a >> 8) | ((b & 0x0f) << 4), b >> 4], (k / 2) * 3);
  }
  out.set(rho, 1152);
  return out;
}
/** @param {Uint8Array} ek */
function coefficientsOf(ek) {
  const out = [];
  for (let i = 0; i < 1152; i += 3) out.push(ek[i] | ((ek[i + 1] & 0x0f) << 8), (ek[i + 1] >> 4) | (ek[i + 2] << 4));
  return out;
}

describe("the relay's keys are checked as relayd checks them", () => {
  const [real] = noPeer ? [] : relayd([{ op: "relay", kem: "MLKEM768_X25519", kid: "r1" }]);

  it("refuses libsodium's X25519 blocklist, with either top bit", () => {
    for (const raw of X25519_BLOCKLIST) {
      assert.equal(takes(checkX25519, raw), false);
      assert.equal(takes(checkX25519, withTopBit(raw)), false);
    }
  });

  it("refuses libsodium's Ed25519 blocklist, with either sign bit", () => {
    for (const raw of ED25519_BLOCKLIST) {
      assert.equal(takes(checkEd25519, raw), false);
      assert.equal(takes(checkEd25519, withTopBit(raw)), false);
    }
  });

  it("RelayPublic refuses a relay JSON with a weak key in either field", { skip: noPeer }, () => {
    const [relay] = relayd([{ op: "relay", kem: "X25519", kid: "r1" }]);
    assert.equal(RelayPublic.fromJSON(relay.public).kid, "r1");
    for (const field of ["enc_public_key", "sign_public_key"]) {
      assert.throws(() => RelayPublic.fromJSON({ ...relay.public, [field]: b64uEncode(le(1n)) }), WeakKeyError);
    }
  });

  it("takes a real hybrid key, and refuses its X25519 half made weak, a zero t or a small t", { skip: noPeer }, () => {
    const key = b64uDecode(real.public.enc_public_key);
    assert.equal(takes(checkMlkem768X25519, key), true);
    const withX = (/** @type {Uint8Array} */ ek, /** @type {Uint8Array} */ x) => Uint8Array.of(...ek, ...x);
    assert.equal(takes(checkMlkem768X25519, withX(key.subarray(0, 1184), le(0n))), false);
    const zero = withX(ekOf(new Array(768).fill(0)), key.subarray(1184));
    assert.equal(takes(checkMlkem768X25519, zero), false);
    fc.assert(fc.property(fc.array(fc.integer({ min: -3, max: 3 }), { minLength: 768, maxLength: 768 }), (t) => {
      const small = withX(ekOf([0, 256, 512].flatMap((k) => ntt(t.slice(k, k + 256)))), key.subarray(1184));
      assert.equal(takes(checkMlkem768X25519, small), false);
    }), { numRuns: 20 });
  });

  it("agrees with relayd on keys made to sit at every edge of the checks", { skip: noPeer }, () => {
    const key = b64uDecode(real.public.enc_public_key);
    const near = fc.oneof(
      fc.constantFrom(...X25519_BLOCKLIST, ...ED25519_BLOCKLIST).chain((raw) => fc.boolean().map((top) => (top ? withTopBit(raw) : raw))),
      fc.bigInt({ min: P - 40n, max: 2n ** 256n - 1n }).map(le),
      fc.uint8Array({ minLength: 32, maxLength: 32 }),
    );
    const cases = fc.sample(fc.oneof(
      near.map((raw) => ({ kind: "X25519", raw })),
      near.map((raw) => ({ kind: "Ed25519", raw })),
      fc.tuple(fc.integer({ min: 0, max: 767 }), fc.integer({ min: 0, max: 4095 })).map(([index, value]) => {
        const t = coefficientsOf(key);
        t[index] = value;
        return { kind: "MLKEM768_X25519", raw: Uint8Array.of(...ekOf(t, key.subarray(1152, 1184)), ...key.subarray(1184)) };
      }),
      near.map((x) => ({ kind: "MLKEM768_X25519", raw: Uint8Array.of(...key.subarray(0, 1184), ...x) })),
    ), { numRuns: 400, seed: 19 });
    const answers = relayd(cases.map(({ kind, raw }) => ({ op: "check_key", kind, raw: b64uEncode(raw) })));
    const check = { X25519: checkX25519, Ed25519: checkEd25519, MLKEM768_X25519: checkMlkem768X25519 };
    const verdicts = cases.map(({ kind, raw }) => takes(check[/** @type {keyof check} */ (kind)], raw));
    assert.deepEqual(verdicts, answers.map((a) => a.ok));
    assert.ok(verdicts.includes(true) && verdicts.includes(false), "both verdicts occur");
  });
});
