// Hostile input at the SDK's door: whatever comes down, openDown returns a message only
// for a body the relay sealed to this device and signed for "down"; everything else is an
// EnvelopeError, never another exception, never a message.

import assert from "node:assert/strict";
import { before, describe, it } from "node:test";
import fc from "fast-check";

import { DeviceKeys, EnvelopeError, RelayPublic, b64uEncode, seal } from "../src/index.js";

const encoder = new TextEncoder();
const DEVICE = "web-1";
const DEVICE_ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$/;

/** The relay's side, played by the SDK's own seal (interop.test.js proves it is relayd's). */
async function relaySide() {
  const signing = /** @type {CryptoKeyPair} */ (await crypto.subtle.generateKey("Ed25519", true, ["sign", "verify"]));
  const signPublic = new Uint8Array(await crypto.subtle.exportKey("raw", signing.publicKey));
  const fake = /** @type {CryptoKeyPair} */ (await crypto.subtle.generateKey("Ed25519", true, ["sign", "verify"]));
  const encPublic = new Uint8Array(32).fill(9); // the relay's HPKE key plays no part in down
  return { signer: signing.privateKey, forger: fake.privateKey, public: new RelayPublic("r2026-11", "X25519", encPublic, signPublic) };
}

/** @param {number} seq */
function downPayload(seq, device = DEVICE) {
  return encoder.encode(JSON.stringify({ v: 1, device, seq, ts: Date.now(), id: crypto.randomUUID(), from: "acme", type: "message", body: { text: "hi" } }));
}

/**
 * The code openDown rejects `body` with; fails the test if it opens or throws anything else.
 * @param {DeviceKeys} keys
 * @param {RelayPublic} relay
 * @param {Uint8Array} body
 */
async function refusal(keys, relay, body) {
  try {
    await keys.openDown(relay, body);
  } catch (error) {
    if (error instanceof EnvelopeError) return error.code;
    throw error;
  }
  assert.fail("a hostile body opened");
}

for (const kem of /** @type {const} */ (["X25519", "MLKEM768_X25519"])) {
  describe(`openDown under hostile input, ${kem}`, () => {
    /** @type {DeviceKeys} */ let keys;
    /** @type {Awaited<ReturnType<typeof relaySide>>} */ let relay;
    /** @type {Uint8Array} */ let good;
    const runs = kem === "X25519" ? 300 : 60;

    /**
     * @param {Uint8Array} payload
     * @param {{direction?: "up" | "down", kid?: string, signer?: CryptoKey}} [how]
     */
    const sealDown = (payload, { direction = "down", kid = DEVICE, signer = relay.signer } = {}) =>
      seal(payload, { direction, kid, kem, recipient: keys.encPublic, signer });

    before(async () => {
      keys = await DeviceKeys.generate(DEVICE, { kem });
      relay = await relaySide();
      good = await sealDown(downPayload(1));
      assert.equal((await keys.openDown(relay.public, good)).seq, 1);
    });

    it("refuses every single-byte change of a good body", async () => {
      await fc.assert(fc.asyncProperty(
        fc.nat({ max: good.length - 1 }), fc.integer({ min: 1, max: 255 }),
        async (at, flip) => {
          const bad = good.slice();
          bad[at] ^= flip;
          const code = await refusal(keys, relay.public, bad);
          assert.ok(code === "decrypt_failed" || code === "malformed", code);
        }), { numRuns: runs });
    });

    it("refuses a good body cut short or with bytes added", async () => {
      await fc.assert(fc.asyncProperty(
        fc.nat({ max: good.length - 1 }), fc.uint8Array({ minLength: 1, maxLength: 64 }),
        async (cut, extra) => {
          await refusal(keys, relay.public, good.slice(0, cut));
          await refusal(keys, relay.public, new Uint8Array([...good, ...extra]));
        }), { numRuns: runs });
    });

    it("refuses random bytes of any length", async () => {
      await fc.assert(fc.asyncProperty(fc.uint8Array({ maxLength: 2048 }), async (bytes) => {
        await refusal(keys, relay.public, bytes);
      }), { numRuns: runs });
    });

    it("refuses a message sealed, or only signed, for the up direction", async () => {
      assert.equal(await refusal(keys, relay.public, await sealDown(downPayload(1), { direction: "up" })), "decrypt_failed");
      // Sealed for down, but signed over the up context: only the signature check can tell.
      const payload = downPayload(1);
      const signature = new Uint8Array(await crypto.subtle.sign("Ed25519", relay.signer,
        new Uint8Array([...encoder.encode("relayd/v1 up\n"), ...payload])));
      assert.equal(await refusal(keys, relay.public, await sealRaw(new Uint8Array([...signature, ...payload]))), "bad_signature");
    });

    it("refuses a message sealed under another device's kid", async () => {
      await fc.assert(fc.asyncProperty(
        fc.stringMatching(DEVICE_ID).filter((kid) => kid !== DEVICE),
        async (kid) => {
          assert.equal(await refusal(keys, relay.public, await sealDown(downPayload(1), { kid })), "decrypt_failed");
        }), { numRuns: Math.min(runs, 100) });
    });

    it("refuses a message signed by any key but the relay's", async () => {
      assert.equal(await refusal(keys, relay.public, await sealDown(downPayload(1), { signer: relay.forger })), "bad_signature");
    });

    it("refuses a signature that no longer covers the payload", async () => {
      // Sign one payload, then seal that signature with another: the HPKE layer is intact,
      // so only the signature check can catch it.
      await fc.assert(fc.asyncProperty(fc.integer({ min: 2, max: 2 ** 40 }), async (seq) => {
        const signedFor = downPayload(1);
        const sealedWith = downPayload(seq);
        const signature = new Uint8Array(await crypto.subtle.sign("Ed25519", relay.signer,
          new Uint8Array([...encoder.encode("relayd/v1 down\n"), ...signedFor])));
        const body = await sealRaw(new Uint8Array([...signature, ...sealedWith]));
        assert.equal(await refusal(keys, relay.public, body), "bad_signature");
      }), { numRuns: Math.min(runs, 50) });
    });

    it("refuses a verified payload that is not a version-1 message for this device", async () => {
      const payloads = [
        downPayload(1, "web-2"),
        encoder.encode("not json"),
        encoder.encode("[1]"),
        encoder.encode(JSON.stringify({ v: 2, device: DEVICE, seq: 1, from: "acme", type: "read", body: {} })),
        encoder.encode(JSON.stringify({ v: 1, device: DEVICE, seq: 0, from: "acme", type: "read", body: {} })),
        encoder.encode(JSON.stringify({ v: 1, device: DEVICE, seq: 2 ** 63, from: "acme", type: "read", body: {} })),
        encoder.encode(JSON.stringify({ v: 1, device: DEVICE, seq: "1", from: "acme", type: "read", body: {} })),
        encoder.encode(JSON.stringify({ v: 1, device: DEVICE, seq: 1, from: "acme", type: "read", body: [] })),
        Uint8Array.of(0xff, 0xfe),
      ];
      for (const payload of payloads) {
        assert.equal(await refusal(keys, relay.public, await sealDown(payload)), "malformed", new TextDecoder().decode(payload));
      }
    });

    /**
     * HPKE-seal `plain` to the device for down, with no signing: for hand-made plaintexts.
     * @param {Uint8Array} plain
     */
    async function sealRaw(plain) {
      const { suite } = await import("../src/suite.js");
      const { info } = await import("../src/envelope.js");
      const hpke = suite(kem);
      const { enc, ct } = await hpke.seal({ recipientPublicKey: await hpke.kem.deserializePublicKey(keys.encPublic), info: info("down", DEVICE) }, plain);
      return new Uint8Array([...new Uint8Array(enc), ...new Uint8Array(ct)]);
    }
  });
}

describe("a relay key from the operator", () => {
  it("is refused when a field is not what `relayd keys show` prints", () => {
    // The keys of docs/protocol.md's test vector; all-zero keys are weak (test/weak.test.js).
    const good = { kid: "r2026-11", kem: "X25519", enc_public_key: "NYBy1jZYgNGu6jKa35EhODhR7SGijjt16WXQ0s0WYlQ", sign_public_key: "A6EHv_POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg" };
    assert.equal(RelayPublic.fromJSON(good).kid, "r2026-11");
    for (const bad of [
      { ...good, kid: "-r" }, { ...good, kem: "P256" }, { ...good, enc_public_key: b64uEncode(new Uint8Array(31)) },
      { ...good, sign_public_key: "not base64url!" }, { ...good, kem: "MLKEM768_X25519" },
    ]) {
      assert.throws(() => RelayPublic.fromJSON(bad), TypeError, JSON.stringify(bad));
    }
  });
});
