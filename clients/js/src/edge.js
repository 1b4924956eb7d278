// A device's connection to the edge: log in, send with ack, receive with acknowledgement,
// reconnect and resume. The wire protocol is docs/protocol.md section 12.
//
// Sending: one send at a time, in the order of send() calls, so that a refusal can never
// let a later message overtake an earlier one. Each is sealed when it goes out, with a
// fresh seq and ts and the same message id on every try (section 3, "Replay window"), and
// resolves on the edge's ack ("the relay has it"). A lost connection, or a nack that says
// "later" (rate_limited, broker_full, unavailable), puts it back first in line; too_large
// and bad_kid reject it.
//
// Receiving: each deliver is opened, handed to onMessage, and acknowledged once onMessage
// has returned. What the edge delivers again after a reconnect is recognised by its down
// seq and acknowledged without a second onMessage.
//
// Liveness: a browser cannot send WebSocket pings, so the client sends the protocol's
// `ping` frame and gives the connection up when no `pong` comes in time.

import { b64uDecode, b64uEncode } from "./b64.js";
import { EnvelopeError, SendError } from "./errors.js";
import { EDGE_NAME, loginFrame, readChallenge } from "./login.js";
import { upPayload } from "./payload.js";
import { DeviceState } from "./state.js";

export const SUBPROTOCOL = "relayd.v1";
/** limits.max_envelope_bytes: the relay's default; a bigger sealed body is never sent. */
export const MAX_ENVELOPE_BYTES = 1_048_576;
/** Nack codes that mean "try again later"; every other code is final. */
const RETRY = new Set(["rate_limited", "broker_full", "unavailable"]);
/** Close codes after which reconnecting cannot help (section 12, "Close codes"). */
const FINAL = new Map([[4401, "login_failed"], [4409, "replaced"], [4400, "bad_frame"], [1007, "bad_frame"], [1009, "too_large"]]);
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
 * open, an onMessage that threw, a frame the edge should not have sent, a lost pong.
 */
export class EdgeClient extends EventTarget {
  #url; #edgeName; #keys; #relay; #state; #onMessage; #WebSocket; #backoff; #ping;
  /** @type {Status} */ #status = "idle";
  /** @type {WebSocket | null} */ #ws = null;
  #attempt = 0;
  /** @type {ReturnType<typeof setTimeout> | undefined} */ #reconnectTimer;
  /** @type {ReturnType<typeof setTimeout> | undefined} */ #holdTimer;
  /** @type {ReturnType<typeof setInterval> | undefined} */ #pingTimer;
  /** @type {Outgoing[]} */ #outbox = [];
  /** @type {{ref: number, item: Outgoing} | null} */ #inflight = null;
  /** @type {number | null} */ #pingRef = null;
  #ref = 0;
  #sealing = false;
  #deliveries = Promise.resolve();

  /**
   * @param {object} options
   * @param {string} options.url the edge, e.g. wss://edge.relay.example/v1/device
   * @param {string} options.edgeName the edge's name, given with the relay's keys; the
   *   client logs in to no edge of another name
   * @param {DeviceKeys} options.keys
   * @param {RelayPublic} options.relay
   * @param {(message: Down) => Promise<void> | void} options.onMessage called once per down
   *   message, in the order delivered; store it before returning
   * @param {DeviceState} [options.state] the seq counter and the seen window (kept in memory if not given)
   * @param {typeof WebSocket} [options.WebSocket] the browser's by default; on Node 20 pass `ws`'s
   * @param {{first?: number, max?: number}} [options.backoff] reconnect and retry delays, ms
   * @param {{interval?: number}} [options.ping] ms between ping frames; the pong of each must
   *   come before the next ping goes, or the connection is given up
   */
  constructor({ url, edgeName, keys, relay, onMessage, state = new DeviceState(), WebSocket = globalThis.WebSocket, backoff = {}, ping = {} }) {
    super();
    if (typeof WebSocket !== "function") throw new TypeError("no WebSocket: pass one (on Node 20, the ws package's)");
    if (typeof edgeName !== "string" || !EDGE_NAME.test(edgeName)) throw new TypeError("edgeName is the edge's name");
    this.#url = url;
    this.#edgeName = edgeName;
    this.#keys = keys;
    this.#relay = relay;
    this.#state = state;
    this.#onMessage = onMessage;
    this.#WebSocket = WebSocket;
    this.#backoff = { first: backoff.first ?? 500, max: backoff.max ?? 30_000 };
    this.#ping = { interval: ping.interval ?? 20_000 };
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
   * @param {string} type start, message, typing_start, typing_end, read, close, response or reaction
   * @param {Record<string, unknown>} [body]
   * @param {{id?: string}} [options] the message id; keep it when you send the same message again
   * @returns {Promise<{id: string, seq: number}>}
   */
  send(to, type, body = {}, { id = crypto.randomUUID() } = {}) {
    upPayload({ device: this.#keys.device, seq: 1, ts: 0, id, to, type, body });
    if (this.#status === "stopped") return Promise.reject(new SendError("stopped", "the client stopped"));
    return new Promise((resolve, reject) => {
      this.#outbox.push({ id, to, type, body, tries: 0, resolve, reject });
      this.#next();
    });
  }

  /** Close for good: pending sends reject with SendError("stopped"). */
  stop(reason = "stopped") {
    if (this.#status === "stopped") return;
    clearTimeout(this.#reconnectTimer);
    clearTimeout(this.#holdTimer);
    this.#drop(1000);
    const pending = [...(this.#inflight ? [this.#inflight.item] : []), ...this.#outbox];
    this.#inflight = null;
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
    if (typeof frame !== "object" || frame === null || Array.isArray(frame)) return this.#violation("not a JSON object in a text frame");
    const expected = this.#status === "ready" ? ["ack", "nack", "deliver", "pong"] : ["challenge", "ready", "refused"];
    if (!expected.includes(frame.type)) return this.#violation(`unexpected ${String(frame.type)} frame`);
    try {
      if (frame.type === "challenge") this.#login(ws, readChallenge(frame)).catch(() => this.stop("login_failed"));
      else if (frame.type === "ready") this.#onReady();
      else if (frame.type === "refused") this.stop("login_failed");
      else if (frame.type === "deliver") this.#onDeliver(ws, tagOf(frame), b64uDecode(frame.sealed));
      else if (frame.type === "pong") this.#onPong(frame.ref);
      else this.#onAnswer(frame);
    } catch (error) {
      this.#violation(error instanceof Error ? error.message : String(error));
    }
  }

  /**
   * @param {WebSocket} ws
   * @param {{edge: string, nonce: Uint8Array}} challenge
   */
  async #login(ws, { edge, nonce }) {
    if (edge !== this.#edgeName) return this.stop("wrong_edge");
    const frame = await loginFrame(this.#keys, edge, nonce);
    if (ws === this.#ws && ws.readyState === OPEN) ws.send(JSON.stringify(frame));
  }

  #onReady() {
    this.#attempt = 0;
    this.#setStatus("ready");
    this.#pingRef = null;
    this.#pingTimer = setInterval(() => this.#heartbeat(), this.#ping.interval);
    this.#next();
  }

  #heartbeat() {
    if (this.#pingRef !== null) {
      this.#problem("no_pong", `no pong within ${this.#ping.interval} ms`);
      return this.#lose();
    }
    this.#pingRef = this.#newRef();
    this.#ws?.send(JSON.stringify({ type: "ping", ref: this.#pingRef }));
  }

  /** @param {unknown} ref */
  #onPong(ref) {
    if (ref !== this.#pingRef) throw new TypeError("a pong to no ping");
    this.#pingRef = null;
  }

  /** @param {Record<string, unknown>} frame an ack or a nack */
  #onAnswer(frame) {
    if (this.#inflight === null || frame.ref !== this.#inflight.ref) throw new TypeError("an answer to no send in flight");
    const { item } = this.#inflight;
    this.#inflight = null;
    if (frame.type === "ack") item.resolve({ id: item.id, seq: /** @type {number} */ (item.seq) });
    else if (RETRY.has(String(frame.code))) this.#retryLater(item);
    else item.reject(new SendError(String(frame.code), "the edge refused the message"));
    this.#next();
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

  /** Seal and send the first message in line, unless one is in flight or sending is held. */
  async #next() {
    if (this.#sealing || this.#inflight || this.#holdTimer !== undefined || this.#status !== "ready") return;
    const item = this.#outbox.shift();
    if (!item) return;
    this.#sealing = true;
    let sealed;
    try {
      item.seq = await this.#state.nextSeq();
      const payload = upPayload({ device: this.#keys.device, seq: item.seq, ts: Date.now(), id: item.id, to: item.to, type: item.type, body: item.body });
      sealed = await this.#keys.sealUp(this.#relay, payload);
    } catch (error) {
      item.reject(error instanceof Error ? error : new Error(String(error)));
    } finally {
      this.#sealing = false;
    }
    if (sealed && sealed.length > MAX_ENVELOPE_BYTES) {
      item.reject(new SendError("too_large", `sealed, it is over ${MAX_ENVELOPE_BYTES} bytes`));
    } else if (sealed && this.#status === "ready" && this.#ws) {
      this.#inflight = { ref: this.#newRef(), item };
      this.#ws.send(JSON.stringify({ type: "send", ref: this.#inflight.ref, kid: this.#relay.kid, sealed: b64uEncode(sealed) }));
      return;
    } else if (sealed) {
      this.#outbox.unshift(item); // sealed again, with a new seq, once logged in again
      return;
    }
    this.#next();
  }

  /**
   * Put `item` first in line again, and hold all sending for a while.
   * @param {Outgoing} item
   */
  #retryLater(item) {
    item.tries += 1;
    this.#outbox.unshift(item);
    this.#holdTimer = setTimeout(() => {
      this.#holdTimer = undefined;
      this.#next();
    }, this.#delay(item.tries));
  }

  /**
   * @param {WebSocket} ws
   * @param {number} code
   */
  #onClose(ws, code) {
    if (ws !== this.#ws) return;
    this.#detach();
    const final = FINAL.get(code);
    if (final) return this.stop(final);
    this.#reconnectLater(String(code));
  }

  /** Give the connection up as lost (a stale ping, a frame no edge sends), and connect again. */
  #lose() {
    this.#drop(4000);
    this.#reconnectLater("lost");
  }

  /**
   * Close the connection, if any, and forget it at once: a dead TCP connection may take
   * long to report its close.
   * @param {number} code
   */
  #drop(code) {
    const ws = this.#ws;
    if (!ws) return;
    this.#detach();
    ws.onmessage = ws.onclose = null;
    ws.close(code);
  }

  /** Forget the connection: what was in flight goes back first in line. */
  #detach() {
    this.#ws = null;
    clearInterval(this.#pingTimer);
    if (this.#inflight) this.#outbox.unshift(this.#inflight.item);
    this.#inflight = null;
  }

  /** @param {string} reason */
  #reconnectLater(reason) {
    this.#attempt += 1;
    this.#setStatus("waiting", reason);
    this.#reconnectTimer = setTimeout(() => {
      if (this.#status === "waiting") this.#connect();
    }, this.#delay(this.#attempt));
  }

  /**
   * The edge sent what the protocol does not allow: close with 4400 and start again.
   * @param {string} detail
   */
  #violation(detail) {
    this.#problem("bad_frame", detail);
    this.#drop(4400);
    this.#reconnectLater("bad_frame");
  }

  #newRef() {
    this.#ref += 1;
    return this.#ref;
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
