// The edge login (docs/protocol.md, the edge wire protocol): the device signs the edge's
// challenge with its Ed25519 key.

import { b64uDecode, b64uEncode } from "./b64.js";
import { concat } from "./envelope.js";

const encoder = new TextEncoder();
export const EDGE_NAME = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$/;

/**
 * What the device signs: "relayd/v1 edge-login\n" + edge name + "\n" + device id + "\n" +
 * the 32 nonce bytes.
 * @param {string} edge
 * @param {string} device
 * @param {Uint8Array} nonce
 */
export function loginBytes(edge, device, nonce) {
  return concat(encoder.encode(`relayd/v1 edge-login\n${edge}\n${device}\n`), nonce);
}

/**
 * The challenge frame's edge name and nonce, checked; TypeError if it is not one.
 * @param {Record<string, unknown>} frame
 */
export function readChallenge(frame) {
  if (frame.v !== 1 || typeof frame.edge !== "string" || !EDGE_NAME.test(frame.edge)) {
    throw new TypeError("a challenge names a version-1 edge");
  }
  const nonce = b64uDecode(frame.nonce);
  if (nonce.length !== 32) throw new TypeError("a challenge nonce is 32 bytes");
  return { edge: frame.edge, nonce };
}

/**
 * The login frame answering a challenge.
 * @param {import("./keys.js").DeviceKeys} keys
 * @param {string} edge
 * @param {Uint8Array} nonce
 */
export async function loginFrame(keys, edge, nonce) {
  return { type: "login", device: keys.device, sig: b64uEncode(await keys.sign(loginBytes(edge, keys.device, nonce))) };
}
