// Sealing and opening, exactly as docs/protocol.md section 2 says.
//
// HPKE single-shot Base mode, empty aad, info = "relayd/v1 " + direction + " " + kid.
// Plaintext = Ed25519 signature (64 bytes) || payload; the signature covers
// "relayd/v1 " + direction + "\n" + payload. The body on the wire is enc || ct.
// Every failure to open raises EnvelopeError with one code; nothing in a payload is used
// before its signature checks out.

import { EnvelopeError } from "./errors.js";
import { kemSpec, suite } from "./suite.js";

/** @typedef {"up" | "down"} Direction */
/** @typedef {import("./suite.js").Kem} Kem */

export const SIGNATURE_BYTES = 64;
const encoder = new TextEncoder();

/**
 * The HPKE info: "relayd/v1 up r2026-11", "relayd/v1 down alice-phone".
 * @param {Direction} direction
 * @param {string} kid
 */
export function info(direction, kid) {
  return encoder.encode(`relayd/v1 ${direction} ${kid}`);
}

/**
 * What the sender signs: "relayd/v1 " + direction + "\n" + payload.
 * @param {Direction} direction
 * @param {Uint8Array} payload
 */
export function signedBytes(direction, payload) {
  return concat(encoder.encode(`relayd/v1 ${direction}\n`), payload);
}

/**
 * Sign `payload` with `signer` (an Ed25519 private CryptoKey), then seal it to `recipient`
 * (the raw HPKE public key of `kem`) under `kid`. Returns enc || ct.
 * @param {Uint8Array} payload
 * @param {{direction: Direction, kid: string, kem: Kem, recipient: Uint8Array, signer: CryptoKey}} to
 * @returns {Promise<Uint8Array>}
 */
export async function seal(payload, { direction, kid, kem, recipient, signer }) {
  const signature = new Uint8Array(
    await crypto.subtle.sign("Ed25519", signer, signedBytes(direction, payload)),
  );
  const hpke = suite(kem);
  const recipientPublicKey = await hpke.kem.deserializePublicKey(recipient);
  const { enc, ct } = await hpke.seal(
    { recipientPublicKey, info: info(direction, kid) },
    concat(signature, payload),
  );
  return concat(new Uint8Array(enc), new Uint8Array(ct));
}

/**
 * Decrypt `body` (enc || ct) with the recipient's HPKE key; returns the signature and the
 * payload, still unverified.
 * @param {Uint8Array} body
 * @param {{direction: Direction, kid: string, kem: Kem, recipientKey: CryptoKeyPair | CryptoKey}} as
 * @returns {Promise<{signature: Uint8Array, payload: Uint8Array}>}
 */
export async function openSealed(body, { direction, kid, kem, recipientKey }) {
  const { encLength } = kemSpec(kem);
  if (!(body instanceof Uint8Array) || body.length <= encLength) {
    throw new EnvelopeError("malformed", "shorter than the KEM's enc");
  }
  let plain;
  try {
    plain = new Uint8Array(
      await suite(kem).open(
        { recipientKey, enc: body.slice(0, encLength), info: info(direction, kid) },
        body.slice(encLength),
      ),
    );
  } catch {
    throw new EnvelopeError("decrypt_failed", "HPKE open failed");
  }
  if (plain.length <= SIGNATURE_BYTES) {
    throw new EnvelopeError("malformed", "no payload after the signature");
  }
  return { signature: plain.slice(0, SIGNATURE_BYTES), payload: plain.slice(SIGNATURE_BYTES) };
}

/**
 * EnvelopeError("bad_signature") unless `signer` (an Ed25519 public CryptoKey) signed
 * `payload` for `direction`.
 * @param {Uint8Array} signature
 * @param {Uint8Array} payload
 * @param {{direction: Direction, signer: CryptoKey}} by
 */
export async function verify(signature, payload, { direction, signer }) {
  const good = await crypto.subtle.verify("Ed25519", signer, signature, signedBytes(direction, payload));
  if (!good) {
    throw new EnvelopeError("bad_signature", "signature does not verify");
  }
}

/**
 * @param {...Uint8Array} parts
 * @returns {Uint8Array}
 */
export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}
