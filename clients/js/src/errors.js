// The SDK's errors: one class per kind of failure, each with a `code` to match on.

/** A sealed message that does not open, verify or parse; `code` as in docs/protocol.md. */
export class EnvelopeError extends Error {
  /**
   * @param {"malformed" | "decrypt_failed" | "bad_signature"} code
   * @param {string} detail
   */
  constructor(code, detail) {
    super(`${code}: ${detail}`);
    this.name = "EnvelopeError";
    this.code = code;
  }
}

/** The edge refused a send for good (`too_large`, `bad_kid`), or the client stopped first. */
export class SendError extends Error {
  /**
   * @param {string} code the edge's nack code, or `stopped` when the client stopped
   * @param {string} [detail]
   */
  constructor(code, detail = "") {
    super(detail ? `${code}: ${detail}` : code);
    this.name = "SendError";
    this.code = code;
  }
}
