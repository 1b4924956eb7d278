// The two parties' keys as a device holds them: the relay's public half, and the device's
// own key pairs.
//
// Where the private keys live:
// - Ed25519 (signing): a WebCrypto key, non-extractable unless asked for.
// - X25519 (HPKE): a WebCrypto key, non-extractable unless asked for; @hpke/core uses
//   WebCrypto's X25519, so opening never needs the raw key.
// - MLKEM768_X25519 (HPKE, X-Wing): its 32-byte seed, as plain bytes. WebCrypto has no
//   ML-KEM, so the X-Wing package computes in JavaScript and needs the raw seed.

import { b64uDecode, b64uEncode } from "./b64.js";
import { concat, openSealed, seal, verify } from "./envelope.js";
import { DEVICE_ID, KID, parseDown } from "./payload.js";
import { kemSpec, suite } from "./suite.js";
import { checkEd25519, checkMlkem768X25519, checkX25519 } from "./weak.js";

/** @typedef {import("./suite.js").Kem} Kem */
/** @typedef {import("./payload.js").Down} Down */

// The fixed DER header of a PKCS #8 key for each curve (RFC 8410), followed by the 32 bytes.
const PKCS8 = {
  Ed25519: Uint8Array.of(0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20),
  X25519: Uint8Array.of(0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x04, 0x22, 0x04, 0x20),
};

/**
 * The relay's public half, as `relayd keys show` prints it. Its keys are checked as relayd
 * checks every public key: a weak one (weak.js) is a WeakKeyError, a TypeError.
 */
export class RelayPublic {
  /**
   * @param {string} kid
   * @param {Kem} kem
   * @param {Uint8Array} encPublicKey
   * @param {Uint8Array} signPublicKey
   */
  constructor(kid, kem, encPublicKey, signPublicKey) {
    if (!KID.test(kid)) throw new TypeError("kid is not a key id");
    if (encPublicKey.length !== kemSpec(kem).publicLength) {
      throw new TypeError(`a ${kem} public key is ${kemSpec(kem).publicLength} bytes`);
    }
    if (signPublicKey.length !== 32) throw new TypeError("an Ed25519 public key is 32 bytes");
    (kem === "X25519" ? checkX25519 : checkMlkem768X25519)(encPublicKey);
    checkEd25519(signPublicKey);
    this.kid = kid;
    this.kem = kem;
    this.encPublicKey = encPublicKey;
    this.signPublicKey = signPublicKey;
    /** @type {Promise<CryptoKey> | undefined} */
    this._verifier = undefined;
  }

  /**
   * From the JSON line of `relayd keys show` (text or parsed).
   * @param {string | {kid: string, kem: Kem, enc_public_key: string, sign_public_key: string}} json
   */
  static fromJSON(json) {
    const data = typeof json === "string" ? JSON.parse(json) : json;
    return new RelayPublic(data.kid, data.kem, b64uDecode(data.enc_public_key), b64uDecode(data.sign_public_key));
  }

  /** The relay's Ed25519 key as a WebCrypto key, for verifying down messages. */
  verifier() {
    this._verifier ??= crypto.subtle.importKey("raw", this.signPublicKey, "Ed25519", true, ["verify"]);
    return this._verifier;
  }
}

/**
 * What DeviceKeys.toRecord returns: structured-cloneable, so IndexedDB stores it as it is
 * (a non-extractable CryptoKey stays non-extractable there).
 * @typedef {object} DeviceRecord
 * @property {1} v
 * @property {string} device
 * @property {Kem} kem
 * @property {CryptoKey} signPrivate
 * @property {Uint8Array} signPublic
 * @property {CryptoKey | Uint8Array} encPrivate a CryptoKey for X25519, the X-Wing seed otherwise
 * @property {Uint8Array} encPublic
 */

/** One device: its id, its Ed25519 key pair and its HPKE key pair. */
export class DeviceKeys {
  /** @param {Omit<DeviceRecord, "v">} record */
  constructor({ device, kem, signPrivate, signPublic, encPrivate, encPublic }) {
    if (!DEVICE_ID.test(device)) throw new TypeError("device is not a device id");
    kemSpec(kem);
    this.device = device;
    this.kem = kem;
    this.signPrivate = signPrivate;
    this.signPublic = signPublic;
    this.encPrivate = encPrivate;
    this.encPublic = encPublic;
    /** @type {Promise<CryptoKeyPair | CryptoKey> | undefined} */
    this._recipient = undefined;
  }

  /**
   * New keys for a new install. Non-extractable private keys unless `extractable`, which a
   * program needs only to write its keys to a file (see `secrets`).
   * @param {string} device
   * @param {{kem?: Kem, extractable?: boolean}} [options]
   */
  static async generate(device, { kem = "X25519", extractable = false } = {}) {
    const sign = /** @type {CryptoKeyPair} */ (await crypto.subtle.generateKey("Ed25519", extractable, ["sign", "verify"]));
    const { encPrivate, encPublic } = kem === "X25519"
      ? await x25519Pair(/** @type {CryptoKeyPair} */ (await crypto.subtle.generateKey("X25519", extractable, ["deriveBits"])))
      : await xwingPair(crypto.getRandomValues(new Uint8Array(32)));
    return new DeviceKeys({
      device, kem, signPrivate: sign.privateKey,
      signPublic: new Uint8Array(await crypto.subtle.exportKey("raw", sign.publicKey)),
      encPrivate, encPublic,
    });
  }

  /**
   * From raw private keys in base64url: the 32-byte Ed25519 seed and the HPKE private key
   * (32 bytes: X25519, or the X-Wing seed). The inverse of `secrets`.
   * @param {{device: string, kem: Kem, sign_private: string, enc_private: string}} secrets
   * @param {{extractable?: boolean}} [options]
   */
  static async fromSecrets({ device, kem, sign_private, enc_private }, { extractable = false } = {}) {
    const seed = exactly(b64uDecode(sign_private), 32, "an Ed25519 private key");
    const encRaw = exactly(b64uDecode(enc_private), 32, `a ${kem} private key`);
    const enc = kem === "X25519"
      ? { encPrivate: await importPrivate("X25519", encRaw, extractable), encPublic: await publicOf("X25519", encRaw) }
      : await xwingPair(encRaw);
    return new DeviceKeys({
      device, kem, ...enc,
      signPrivate: await importPrivate("Ed25519", seed, extractable),
      signPublic: await publicOf("Ed25519", seed),
    });
  }

  /**
   * The raw private keys in base64url, for a program that keeps its keys in a file of its
   * own; throws for keys generated non-extractable.
   */
  async secrets() {
    const jwk = await crypto.subtle.exportKey("jwk", this.signPrivate);
    const enc = this.encPrivate instanceof Uint8Array
      ? b64uEncode(this.encPrivate)
      : /** @type {string} */ ((await crypto.subtle.exportKey("jwk", this.encPrivate)).d);
    return { device: this.device, kem: this.kem, sign_private: /** @type {string} */ (jwk.d), enc_private: enc };
  }

  /** @returns {DeviceRecord} */
  toRecord() {
    const { device, kem, signPrivate, signPublic, encPrivate, encPublic } = this;
    return { v: 1, device, kem, signPrivate, signPublic, encPrivate, encPublic };
  }

  /** @param {DeviceRecord} record */
  static fromRecord(record) {
    if (record?.v !== 1) throw new TypeError("not a version-1 device record");
    return new DeviceKeys(record);
  }

  /**
   * What an operator passes to `relayd device add` (or the identity service enrols).
   * @param {string} user
   */
  registration(user) {
    return { user, device: this.device, kem: this.kem, enc_key: b64uEncode(this.encPublic), sign_key: b64uEncode(this.signPublic) };
  }

  /**
   * Ed25519-sign `bytes` with the device's key.
   * @param {Uint8Array} bytes
   */
  async sign(bytes) {
    return new Uint8Array(await crypto.subtle.sign("Ed25519", this.signPrivate, bytes));
  }

  /**
   * Sign and seal an up payload to the relay's current key: the body for the edge.
   * @param {RelayPublic} relay
   * @param {Uint8Array} payload
   */
  sealUp(relay, payload) {
    return seal(payload, { direction: "up", kid: relay.kid, kem: relay.kem, recipient: relay.encPublicKey, signer: this.signPrivate });
  }

  /**
   * Open, verify and check one down message; EnvelopeError if anything is wrong.
   * @param {RelayPublic} relay
   * @param {Uint8Array} body
   * @returns {Promise<Down>}
   */
  async openDown(relay, body) {
    const { signature, payload } = await openSealed(body, { direction: "down", kid: this.device, kem: this.kem, recipientKey: await this.recipientKey() });
    await verify(signature, payload, { direction: "down", signer: await relay.verifier() });
    return parseDown(payload, this.device);
  }

  /** The HPKE private key in the form @hpke/core opens with. */
  recipientKey() {
    this._recipient ??= this.encPrivate instanceof Uint8Array
      ? suite(this.kem).kem.deserializePrivateKey(this.encPrivate)
      : crypto.subtle.importKey("raw", this.encPublic, "X25519", true, []).then(
        (publicKey) => ({ privateKey: /** @type {CryptoKey} */ (this.encPrivate), publicKey }));
    return this._recipient;
  }
}

/**
 * A raw 32-byte private key as a WebCrypto key.
 * @param {"Ed25519" | "X25519"} curve
 * @param {Uint8Array} raw
 * @param {boolean} extractable
 */
function importPrivate(curve, raw, extractable) {
  const usages = curve === "Ed25519" ? ["sign"] : ["deriveBits"];
  return crypto.subtle.importKey("pkcs8", concat(PKCS8[curve], raw), curve, extractable, /** @type {KeyUsage[]} */ (usages));
}

/**
 * The raw public key of a raw 32-byte private key.
 * @param {"Ed25519" | "X25519"} curve
 * @param {Uint8Array} raw
 */
async function publicOf(curve, raw) {
  const { x } = await crypto.subtle.exportKey("jwk", await importPrivate(curve, raw, true));
  return b64uDecode(/** @type {string} */ (x));
}

/** @param {CryptoKeyPair} pair */
async function x25519Pair(pair) {
  return { encPrivate: pair.privateKey, encPublic: new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey)) };
}

/** @param {Uint8Array} seed */
async function xwingPair(seed) {
  const xwing = /** @type {import("@hpke/hybridkem-x-wing").XWing} */ (suite("MLKEM768_X25519").kem);
  const { publicKey } = await xwing.generateKeyPairDerand(seed);
  return { encPrivate: seed, encPublic: new Uint8Array(await xwing.serializePublicKey(publicKey)) };
}

/**
 * @param {Uint8Array} bytes
 * @param {number} length
 * @param {string} what
 */
function exactly(bytes, length, what) {
  if (bytes.length !== length) throw new TypeError(`${what} is ${length} bytes`);
  return bytes;
}
