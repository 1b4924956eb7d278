// The payloads of docs/protocol.md sections 3 and 4: building an up payload, checking a
// down one. The relay validates every up field itself; the checks here (the body's by
// rich.js, with relayd's default limits) keep the SDK from sealing what the relay would
// only dead-letter.

import { EnvelopeError } from "./errors.js";
import { bodyProblem } from "./rich.js";

export const DEVICE_ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$/;
export const BUSINESS_ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
export const KID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
export const UUID = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;
export const UP_TYPES = Object.freeze(["start", "message", "typing_start", "typing_end", "read", "close", "response", "reaction"]);
export const DOWN_TYPES = Object.freeze(["message", "typing_start", "typing_end", "read", "close", "reaction", "echo", "error"]);

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

/**
 * @typedef {object} Up
 * @property {string} device
 * @property {number} seq
 * @property {number} ts unix milliseconds
 * @property {string} id a UUID, the same on every retry of this message
 * @property {string} to the business id
 * @property {string} type one of UP_TYPES
 * @property {Record<string, unknown>} body
 */

/**
 * @typedef {object} Down
 * @property {1} v
 * @property {string} device
 * @property {number} seq
 * @property {number} ts
 * @property {string} id
 * @property {string} from
 * @property {string} type one of DOWN_TYPES
 * @property {Record<string, unknown>} body
 */

/**
 * The bytes of an up payload: compact JSON of exactly the eight fields, UTF-8.
 * TypeError for a field the relay would refuse as malformed.
 * @param {Up} up
 * @returns {Uint8Array}
 */
export function upPayload({ device, seq, ts, id, to, type, body }) {
  if (!DEVICE_ID.test(device)) throw new TypeError("device is not a device id");
  if (!Number.isSafeInteger(seq) || seq < 1) throw new TypeError("seq is an integer >= 1");
  if (!Number.isSafeInteger(ts) || ts < 0) throw new TypeError("ts is unix milliseconds");
  if (!UUID.test(id)) throw new TypeError("id is a UUID");
  if (!BUSINESS_ID.test(to)) throw new TypeError("to is not a business id");
  if (!UP_TYPES.includes(type)) throw new TypeError(`type is one of ${UP_TYPES.join(", ")}`);
  const problem = bodyProblem(type, body, "user");
  if (problem) throw new TypeError(problem);
  return encoder.encode(JSON.stringify({ v: 1, device, seq, ts, id, to, type, body }));
}

/**
 * Parse a verified down payload and check it is a version-1 message for `device`, with a
 * seq the SDK can count on; EnvelopeError("malformed") otherwise.
 * @param {Uint8Array} payload
 * @param {string} device
 * @returns {Down}
 */
export function parseDown(payload, device) {
  let message;
  try {
    message = JSON.parse(decoder.decode(payload));
  } catch {
    throw new EnvelopeError("malformed", "payload is not JSON");
  }
  if (!isObject(message) || message.v !== 1 || message.device !== device) {
    throw new EnvelopeError("malformed", "not a version-1 message for this device");
  }
  if (!Number.isSafeInteger(message.seq) || message.seq < 1) {
    throw new EnvelopeError("malformed", "seq is not an integer from 1 to 2^53-1");
  }
  if (typeof message.type !== "string" || typeof message.from !== "string" || !isObject(message.body)) {
    throw new EnvelopeError("malformed", "type, from or body is missing");
  }
  return /** @type {Down} */ (message);
}

/**
 * @param {unknown} value
 * @returns {value is Record<string, unknown>}
 */
function isObject(value) {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
