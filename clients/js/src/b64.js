// base64url without padding, as the contract writes every byte string.

const B64URL = /^[A-Za-z0-9_-]*={0,2}$/;

/**
 * Encode bytes as base64url without padding.
 * @param {Uint8Array} bytes
 * @returns {string}
 */
export function b64uEncode(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/**
 * Decode base64url, with or without padding; TypeError on anything else.
 * @param {unknown} text
 * @returns {Uint8Array}
 */
export function b64uDecode(text) {
  if (typeof text !== "string" || !B64URL.test(text) || text.replace(/=+$/, "").length % 4 === 1) {
    throw new TypeError("not base64url text");
  }
  const binary = atob(text.replace(/=+$/, "").replace(/-/g, "+").replace(/_/g, "/"));
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}
