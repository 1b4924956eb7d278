// The test vectors of docs/protocol.md: the SDK signs, seals and opens byte for byte as
// the contract says.

import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { DeviceKeys, b64uDecode, b64uEncode, info, loginBytes, loginFrame, openSealed, signedBytes } from "../src/index.js";

const hex = (/** @type {string} */ text) => Uint8Array.from(text.match(/../g) ?? [], (h) => parseInt(h, 16));
const toHex = (/** @type {Uint8Array} */ bytes) => Buffer.from(bytes).toString("hex");
const SEED = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

// docs/protocol.md, "A test vector".
const UP = {
  devicePublic: "A6EHv_POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg",
  relayPrivate: "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f",
  relayPublic: "NYBy1jZYgNGu6jKa35EhODhR7SGijjt16WXQ0s0WYlQ",
  info: "72656c6179642f76312075702072323032362d3131",
  payload: '{"v":1,"device":"alice-phone","seq":1,"ts":1795934264206,"id":"1529c64c-6739-4641-a36c-403d0ad052f5","to":"acme","type":"message","body":{"text":"Thanks!"}}',
  signature: "1aa6ba4290decf40781b435c518d25c7ab298a465ecb0dd46bffdc0b3cefd52f7d18163a1d14abbadd55c1ef06c52e95d45070e0dd15f0c1290b8bc3f8c99c07",
  enc: "29e6109c0ef1fd2e612f9983925dee635aa75bffbc8aacb42dab15ea75f3bb22",
  ct: "9cea41bd9ba28a58afec8a84a226e000caf6617e08b41bb9d7a52d153976446036fe835d80f81118ccbc3570c68cc1a9b83c5ac69b10c95da96ab9755ffc4eb72ecc8e7a5542f2ede50b14284dd2ec3b41d644b78ed8a150dd279bc0599b79f30a83775c547685eb49297266179b465c36840c31638b981b14a1cb61e022270accabe7b0bdd57c7594200cb6b4b12364c1eb567b791d4d205b21d34dfb0bf671737d5020be300d5a3d2435acf6084df0133d175acf9208cf8482346ddc4dc91c60a46d218085dc8c9b7f5ab328de8e00c314b4de69f8130931a33c0f35a86c6482aa3e86f247061c915887dd",
};

// docs/protocol.md section 12, "A test vector for the login signature".
const LOGIN = {
  edge: "edge-1.relay.example",
  device: "alice-phone",
  nonce: "QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8",
  signed: "72656c6179642f763120656467652d6c6f67696e0a656467652d312e72656c61792e6578616d706c650a616c6963652d70686f6e650a404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f",
  signature: "fc2cd7d7e1f5305e5c2a2a5a4e833b3870f05f211830d25d3c727de7fbb6c31dc681769977c01f350dcdc70a15a96e827366d961d3314c4796dcd060521ca70d",
  sig: "_CzX1-H1MF5cKipaToM7OHDwXyEYMNJdPHJ95_u2wx3GgXaZd8AfNQ3NxwoVqW6Cc2bZYdMxTEeW3NBgUhynDQ",
};

/** The vector's device (its Ed25519 seed) with the relay's X25519 key as its HPKE key. */
function vectorKeys(device = "alice-phone") {
  return DeviceKeys.fromSecrets({ device, kem: "X25519", sign_private: b64uEncode(hex(SEED)), enc_private: b64uEncode(hex(UP.relayPrivate)) });
}

describe("the up test vector", () => {
  it("derives the vector's public keys from its private keys", async () => {
    const keys = await vectorKeys();
    assert.equal(b64uEncode(keys.signPublic), UP.devicePublic);
    assert.equal(b64uEncode(keys.encPublic), UP.relayPublic);
  });

  it("builds the vector's info and signs the payload to the vector's signature", async () => {
    const keys = await vectorKeys();
    assert.equal(toHex(info("up", "r2026-11")), UP.info);
    const signature = await keys.sign(signedBytes("up", new TextEncoder().encode(UP.payload)));
    assert.equal(toHex(signature), UP.signature);
  });

  it("opens the vector's body to signature || payload", async () => {
    const keys = await vectorKeys();
    const body = new Uint8Array([...hex(UP.enc), ...hex(UP.ct)]);
    assert.equal(body.length, 268);
    const { signature, payload } = await openSealed(body, { direction: "up", kid: "r2026-11", kem: "X25519", recipientKey: await keys.recipientKey() });
    assert.equal(toHex(signature), UP.signature);
    assert.equal(new TextDecoder().decode(payload), UP.payload);
  });
});

describe("the login test vector", () => {
  it("signs the vector's bytes to the vector's signature, and puts it in the login frame", async () => {
    const keys = await vectorKeys(LOGIN.device);
    const bytes = loginBytes(LOGIN.edge, LOGIN.device, b64uDecode(LOGIN.nonce));
    assert.equal(toHex(bytes), LOGIN.signed);
    assert.equal(toHex(await keys.sign(bytes)), LOGIN.signature);
    assert.deepEqual(await loginFrame(keys, LOGIN.edge, b64uDecode(LOGIN.nonce)), { type: "login", device: LOGIN.device, sig: LOGIN.sig });
  });
});
