// The HPKE suites of the contract: RFC 9180 Base mode, HKDF-SHA256, ChaCha20-Poly1305,
// with the KEM the recipient's key names.

import { CipherSuite, DhkemX25519HkdfSha256, HkdfSha256 } from "@hpke/core";
import { Chacha20Poly1305 } from "@hpke/chacha20poly1305";
import { XWing } from "@hpke/hybridkem-x-wing";

/** @typedef {"X25519" | "MLKEM768_X25519"} Kem */

/**
 * Per KEM: the length of `enc` at the front of a sealed body, of a raw public key, and how
 * to make the KEM. X25519 is WebCrypto's own (so a device's private key can stay
 * non-extractable); MLKEM768_X25519 is X-Wing (KEM id 0x647A), as cryptography implements it.
 */
export const KEMS = Object.freeze({
  X25519: { encLength: 32, publicLength: 32, make: () => new DhkemX25519HkdfSha256() },
  MLKEM768_X25519: { encLength: 1120, publicLength: 1216, make: () => new XWing() },
});

/** @type {Map<Kem, CipherSuite>} */
const suites = new Map();

/**
 * The cipher suite for `kem`.
 * @param {Kem} kem
 * @returns {CipherSuite}
 */
export function suite(kem) {
  const spec = kemSpec(kem);
  let found = suites.get(kem);
  if (!found) {
    found = new CipherSuite({ kem: spec.make(), kdf: new HkdfSha256(), aead: new Chacha20Poly1305() });
    suites.set(kem, found);
  }
  return found;
}

/**
 * The table row of `kem`; TypeError for a KEM the contract does not name.
 * @param {unknown} kem
 */
export function kemSpec(kem) {
  if (kem !== "X25519" && kem !== "MLKEM768_X25519") {
    throw new TypeError("kem is X25519 or MLKEM768_X25519");
  }
  return KEMS[kem];
}
