// A device's connection to the edge: log in, send with ack, receive with acknowledgement,
// reconnect and resume. The wire protocol is the edge's (docs/protocol.md).
//
// Sending: each send() is sealed when it goes out, with a fresh seq and ts and the same
// message id on every try (docs/protocol.md, "Replay window"). It resolves on the edge's
// ack ("the relay has it"). A disconnect or a nack that says "later" (rate_limited,
// broker_full, unavailable) puts it back in line; too_large and bad_kid reject it.
//
// Receiving: each deliver frame is opened, handed to onMessage, and acknowledged once
// onMessage has returned. What the edge delivers again after a reconnect is recognised
// by its down seq and acknowledged without a second onMessage.

import { b64uDecode, b64uEncode } from "./b64.js";
import { EnvelopeError, SendError } from "./errors.js";
import { loginFrame, readChallenge } from "./login.js";
import { upPayload } from "./payload.js";
import { DeviceState } from "./state.js";

export const SUBPROTOCOL = "relayd.v1";
/** limits.max_envelope_bytes: the relay's default; a bigger sealed body is never sent. */
export const MAX_ENVELOPE_BYTES = 1_048_576;
/** Nack codes that mean "try again later"; every other code is final. */
const RETRY = new Set(["rate_limited", "broker_full", "unavailable"]);
/** Close codes after which reconnecting cannot help. */
const FINAL = new Map([[4401, "login_failed"], [4409, "replaced"], [4400, "bad_frame"], [1009, "too_large"]]);
const OPEN = 1;

/** @typedef {import("./keys.js").DeviceKeys} DeviceKeys */
/** @typedef {import("./keys.js").RelayPublic} RelayPublic */
/** @typedef {import("./payload.js").Down} Down */
/** @typedef {"idle" | "connecting" | "ready" | "waiting" | "stopped"} Status */
/**
 * @typedef {object} Outgoing
 * @property {string} id
 * @property {string} to
 * @property {string} type
 * @property {Record<string, unknown>} body
 * @property {number} tries
 * @property {number} [seq]
 * @property {(sent: {id: string, seq: number}) => void} resolve
 * @property {(error: Error) => void} reject
 */

/**
 * Events: "status" (detail {status, reason}) whenever the status changes, and "problem"
 * (detail {what, code}) for what the app may want to log: a down message that did not
 * open, an onMessage that threw, a frame the edge should not have sent.
 */
export class EdgeClient extends EventTarget {
  #url; #keys; #relay; #state; #onMessage; #WebSocket; #edgeName; #backoff;
  /** @type {Status} */ #status = "idle";
  /** @type {WebSocket | null} */ #ws = null;
  #attempt = 0;
  /** @type {ReturnType<typeof setTimeout> | null} */ #reconnectTimer = null;
  /** @type {ReturnType<typeof setTimeout> | null} */ #holdTimer = null;
  /** @type {Outgoing[]} */ #outbox = [];
  /** @type {Map<number, Outgoing>} */ #inflight = new Map();
  #ref = 0;
  #pumping = false;
  #deliveries = Promise.resolve();
  /** @type {WeakSet<WebSocket>} */ #closedByUs = new WeakSet();

  /**
   * @param {object} options
   * @param {string} options.url the edge, e.g. wss://edge.example/v1/device
   * @param {DeviceKeys} options.keys
   * @param {RelayPublic} options.relay
   * @param {(message: Down) => Promise<void> | void} options.onMessage called once per down
   *   message, in the order delivered; store it before returning
   * @param {DeviceState} [options.state] the seq counter and the seen window (kept in memory if not given)
   * @param {typeof WebSocket} [options.WebSocket] the browser's by default; on Node 20 pass `ws`'s
   * @param {string} [options.edgeName] if given, refuse to log in to an edge of another name
   * @param {{first?: number, max?: number}} [options.backoff] reconnect and retry delays, ms
   */
  constructor({ url, keys, relay, onMessage, state = new DeviceState(), WebSocket = globalThis.WebSocket, edgeName, backoff = {} }) {
    super();
    if (typeof WebSocket !== "function") throw new TypeError("no WebSocket: pass one (on Node 20, the ws package's)");
    this.#url = url;
    this.#keys = keys;
    this.#relay = relay;
    this.#state = state;
    this.#onMessage = onMessage;
    this.#WebSocket = WebSocket;
    this.#edgeName = edgeName;
    this.#backoff = { first: backoff.first ?? 500, max: backoff.max ?? 30_000 };
  }

  /** @returns {Status} */
  get status() {
    return this.#status;
  }

  /** Connect, and keep connecting until stop(). */
  start() {
    if (this.#status === "idle") this.#connect();
  }

  /** Resolves when the client is logged in (at once if it is); rejects if it stops first. */
  ready() {
    return new Promise((resolve, reject) => {
      const check = () => {
        if (this.#status === "ready") resolve(undefined);
        else if (this.#status === "stopped") reject(new SendError("stopped", "the client stopped"));
        else return;
        this.removeEventListener("status", check);
      };
      this.addEventListener("status", check);
      check();
    });
  }

  /**
   * Send one up message; resolves with its id and the seq it went out with once the edge
   * acks it. A TypeError at once for a message the relay would refuse; SendError for a
   * nack that is final, or if the client stops first.
   * @param {string} to the business id
   * @param {string} type start, message, typing_start, typing_end, read or close
   * @param {Record<string, unknown>} [body]
   * @param {{id?: string}} [options] the message id; keep it when you send the same message again
   * @returns {Promise<{id: string, seq: number}>}
   */
  send(to, type, body = {}, { id = crypto.randomUUID() } = {}) {
    upPayload({ device: this.#keys.device, seq: 1, ts: 0, id, to, type, body });
    if (this.#status === "stopped") return Promise.reject(new SendError("stopped", "the client stopped"));
    return new Promise((resolve, reject) => {
      this.#outbox.push({ id, to, type, body, tries: 0, resolve, reject });
      this.#pump();
    });
  }

  /** Close for good: pending sends reject with SendError("stopped"). */
  stop(reason = "stopped") {
    if (this.#status === "stopped") return;
    clearTimeout(this.#reconnectTimer ?? undefined);
    clearTimeout(this.#holdTimer ?? undefined);
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      this.#closedByUs.add(ws);
      ws.close(1000);
    }
    const pending = [...this.#inflight.values(), ...this.#outbox];
    this.#inflight.clear();
    this.#outbox = [];
    this.#setStatus("stopped", reason);
    for (const item of pending) item.reject(new SendError("stopped", reason));
  }

  #connect() {
    this.#setStatus("connecting");
    const ws = new this.#WebSocket(this.#url, SUBPROTOCOL);
    this.#ws = ws;
    ws.onmessage = (event) => this.#onFrame(ws, event.data);
    ws.onclose = (event) => this.#onClose(ws, event.code);
    ws.onerror = () => {}; // a close event follows
  }

  /**
   * @param {WebSocket} ws
   * @param {unknown} data
   */
  #onFrame(ws, data) {
    if (ws !== this.#ws) return;
    let frame;
    try {
      frame = typeof data === "string" ? JSON.parse(data) : undefined;
    } catch {
      frame = undefined;
    }
    if (typeof frame !== "object" || frame === null || Array.isArray(frame)) return this.#violation(ws, "not a JSON object in a text frame");
    const expected = this.#status === "ready" ? ["ack", "nack", "deliver"] : ["challenge", "ready", "refused"];
    if (!expected.includes(frame.type)) return this.#violation(ws, `unexpected ${String(frame.type)} frame`);
    try {
      if (frame.type === "challenge") this.#login(ws, readChallenge(frame)).catch(() => this.stop("login_failed"));
      else if (frame.type === "ready") this.#onReady();
      else if (frame.type === "refused") this.stop(String(frame.code));
      else if (frame.type === "deliver") this.#onDeliver(ws, tagOf(frame), b64uDecode(frame.sealed));
      else this.#onAnswer(frame);
    } catch (error) {
      this.#violation(ws, error instanceof Error ? error.message : String(error));
    }
  }

  /**
   * @param {WebSocket} ws
   * @param {{edge: string, nonce: Uint8Array}} challenge
   */
  async #login(ws, { edge, nonce }) {
    if (this.#edgeName !== undefined && edge !== this.#edgeName) return this.stop("wrong_edge");
    const frame = await loginFrame(this.#keys, edge, nonce);
    if (ws === this.#ws && ws.readyState === OPEN) ws.send(JSON.stringify(frame));
  }

  #onReady() {
    this.#attempt = 0;
    this.#setStatus("ready");
    this.#pump();
  }

  /** @param {Record<string, unknown>} frame an ack or a nack */
  #onAnswer(frame) {
    const ref = /** @type {number} */ (frame.ref);
    const item = this.#inflight.get(ref);
    if (!item) throw new TypeError("an answer to no send in flight");
    this.#inflight.delete(ref);
    if (frame.type === "ack") item.resolve({ id: item.id, seq: /** @type {number} */ (item.seq) });
    else if (RETRY.has(String(frame.code))) this.#retryLater(item);
    else item.reject(new SendError(String(frame.code), "the edge refused the message"));
  }

  /**
   * @param {WebSocket} ws
   * @param {number} tag
   * @param {Uint8Array} sealed
   */
  #onDeliver(ws, tag, sealed) {
    this.#deliveries = this.#deliveries
      .then(() => this.#deliver(ws, tag, sealed))
      .catch(() => this.#problem("state_failed", "the seen window was not saved"));
  }

  /**
   * @param {WebSocket} ws
   * @param {number} tag
   * @param {Uint8Array} sealed
   */
  async #deliver(ws, tag, sealed) {
    let message;
    try {
      message = await this.#keys.openDown(this.#relay, sealed);
    } catch (error) {
      // It will never open on this device: acknowledge it, so it does not come back.
      this.#problem("undeliverable", error instanceof EnvelopeError ? error.code : "malformed");
      return this.#received(ws, tag);
    }
    if (!this.#state.isSeen(message.seq)) {
      try {
        await this.#onMessage(message);
      } catch {
        // Not acknowledged: the edge delivers it again on the next connection.
        return this.#problem("handler_failed", "onMessage threw");
      }
      await this.#state.markSeen(message.seq);
    }
    this.#received(ws, tag);
  }

  /**
   * @param {WebSocket} ws
   * @param {number} tag
   */
  #received(ws, tag) {
    if (ws === this.#ws && ws.readyState === OPEN) ws.send(JSON.stringify({ type: "received", tag }));
  }

  async #pump() {
    if (this.#pumping) return;
    this.#pumping = true;
    try {
      while (this.#status === "ready" && this.#holdTimer === null && this.#outbox.length > 0) {
        const ws = /** @type {WebSocket} */ (this.#ws);
        const item = /** @type {Outgoing} */ (this.#outbox.shift());
        let sealed;
        try {
          item.seq = await this.#state.nextSeq();
          const payload = upPayload({ device: this.#keys.device, seq: item.seq, ts: Date.now(), id: item.id, to: item.to, type: item.type, body: item.body });
          sealed = await this.#keys.sealUp(this.#relay, payload);
        } catch (error) {
          item.reject(error instanceof Error ? error : new Error(String(error)));
          continue;
        }
        if (sealed.length > MAX_ENVELOPE_BYTES) {
          item.reject(new SendError("too_large", `sealed, it is over ${MAX_ENVELOPE_BYTES} bytes`));
          continue;
        }
        if (ws !== this.#ws || this.#status !== "ready") {
          this.#outbox.unshift(item); // sealed again, with a new seq, on the next connection
          break;
        }
        this.#ref += 1;
        this.#inflight.set(this.#ref, item);
        ws.send(JSON.stringify({ type: "send", ref: this.#ref, kid: this.#relay.kid, sealed: b64uEncode(sealed) }));
      }
    } finally {
      this.#pumping = false;
    }
  }

  /**
   * Put `item` first in line again, and hold all sending for a while.
   * @param {Outgoing} item
   */
  #retryLater(item) {
    item.tries += 1;
    this.#outbox.unshift(item);
    if (this.#holdTimer !== null) return;
    this.#holdTimer = setTimeout(() => {
      this.#holdTimer = null;
      this.#pump();
    }, this.#delay(item.tries));
  }

  /**
   * @param {WebSocket} ws
   * @param {number} code
   */
  #onClose(ws, code) {
    if (ws !== this.#ws) return;
    this.#ws = null;
    const back = [...this.#inflight.entries()].sort(([a], [b]) => a - b).map(([, item]) => item);
    this.#inflight.clear();
    this.#outbox.unshift(...back);
    const final = this.#closedByUs.has(ws) ? undefined : FINAL.get(code);
    if (final) return this.stop(final);
    this.#attempt += 1;
    this.#setStatus("waiting", String(code));
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = null;
      if (this.#status === "waiting") this.#connect();
    }, this.#delay(this.#attempt));
  }

  /**
   * The edge sent what the protocol does not allow: close this connection and start again.
   * @param {WebSocket} ws
   * @param {string} detail
   */
  #violation(ws, detail) {
    this.#problem("bad_frame", detail);
    this.#closedByUs.add(ws);
    ws.close(4400, "bad_frame");
  }

  /** @param {number} attempt */
  #delay(attempt) {
    const { first, max } = this.#backoff;
    return Math.min(max, first * 2 ** Math.min(attempt - 1, 30)) * (0.5 + Math.random() / 2);
  }

  /**
   * @param {Status} status
   * @param {string} [reason]
   */
  #setStatus(status, reason) {
    this.#status = status;
    this.dispatchEvent(new CustomEvent("status", { detail: { status, reason } }));
  }

  /**
   * @param {string} what
   * @param {string} code
   */
  #problem(what, code) {
    this.dispatchEvent(new CustomEvent("problem", { detail: { what, code } }));
  }
}

/** @param {Record<string, unknown>} frame */
function tagOf(frame) {
  if (!Number.isSafeInteger(frame.tag) || /** @type {number} */ (frame.tag) < 1) throw new TypeError("a deliver tag is an integer >= 1");
  return /** @type {number} */ (frame.tag);
}
