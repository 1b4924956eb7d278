// An edge for the SDK's tests: the wire protocol of docs/protocol.md ("The edge") over a
// real WebSocket server on loopback, with a queue per device instead of RabbitMQ. It
// checks logins as the edge does, and records every frame, so a test can see what the SDK
// put on the wire. (The real edge is tested against the SDK in the browser round.)

import { WebSocketServer } from "ws";

const OPEN = 1;

/**
 * @typedef {object} Send
 * @property {string} device
 * @property {number} ref
 * @property {string} kid
 * @property {Uint8Array} sealed
 */

export class EdgeDouble {
  /**
   * @param {object} options
   * @param {Map<string, Uint8Array>} options.devices device id -> Ed25519 public key
   * @param {string} [options.name]
   * @param {(send: Send) => Promise<object | null> | object | null} [options.answer] the
   *   ack or nack for a send (null: no answer)
   * @param {number} [options.maxUnacked]
   */
  static async start({ devices, name = "edge-1", answer = () => ({ type: "ack" }), maxUnacked = 64 }) {
    const edge = new EdgeDouble(devices, name, answer, maxUnacked);
    await new Promise((resolve) => edge.server.once("listening", resolve));
    return edge;
  }

  /**
   * @param {Map<string, Uint8Array>} devices
   * @param {string} name
   * @param {(send: Send) => Promise<object | null> | object | null} answer
   * @param {number} maxUnacked
   */
  constructor(devices, name, answer, maxUnacked) {
    this.devices = devices;
    this.name = name;
    this.answer = answer;
    this.maxUnacked = maxUnacked;
    /** @type {Send[]} */ this.sends = [];
    /** @type {object[]} every frame a device sent, in order */ this.frames = [];
    /** @type {Map<string, Uint8Array[]>} */ this.queues = new Map();
    /** @type {Map<string, import("ws").WebSocket>} */ this.live = new Map();
    this.logins = 0;
    this.ignoreReceived = false;
    this.silent = false; // true: no pong to a ping
    /** @type {{kind: string, resolve: (value: any) => void}[]} */ this.waiters = [];
    this.server = new WebSocketServer({ host: "127.0.0.1", port: 0, handleProtocols: (protocols) => (protocols.has("relayd.v1") ? "relayd.v1" : false) });
    this.server.on("connection", (ws) => this.#connection(ws));
  }

  get url() {
    const { port } = /** @type {import("node:net").AddressInfo} */ (this.server.address());
    return `ws://127.0.0.1:${port}/v1/device`;
  }

  /**
   * The next event of `kind` ("login", "send", "received", "close", "frame"), or a failure
   * after `ms`.
   * @param {string} kind
   */
  next(kind, ms = 5000) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no ${kind} within ${ms} ms`)), ms);
      this.waiters.push({ kind, resolve: (value) => { clearTimeout(timer); resolve(value); } });
    });
  }

  /**
   * Queue a sealed down message for `device`, delivered when it is logged in.
   * @param {string} device
   * @param {Uint8Array} sealed
   */
  deliver(device, sealed) {
    this.#queue(device).push(sealed);
    const ws = this.live.get(device);
    if (ws) this.#pump(ws);
  }

  /** Drop every connection as a network failure would (no close frame). */
  dropAll() {
    for (const ws of this.server.clients) ws.terminate();
  }

  /**
   * Send `data` as it is to `device`'s live connection.
   * @param {string} device
   * @param {string | Uint8Array} data
   */
  raw(device, data) {
    this.live.get(device)?.send(data);
  }

  close() {
    for (const ws of this.server.clients) ws.terminate();
    return new Promise((resolve) => this.server.close(resolve));
  }

  /**
   * @param {string} kind
   * @param {unknown} value
   */
  #emit(kind, value) {
    const i = this.waiters.findIndex((w) => w.kind === kind);
    if (i >= 0) this.waiters.splice(i, 1)[0].resolve(value);
  }

  /** @param {string} device */
  #queue(device) {
    if (!this.queues.has(device)) this.queues.set(device, []);
    return /** @type {Uint8Array[]} */ (this.queues.get(device));
  }

  /** @param {import("ws").WebSocket} ws */
  #connection(ws) {
    const nonce = crypto.getRandomValues(new Uint8Array(32));
    /** @type {{device: string | null, tag: number, unacked: Map<number, Uint8Array>}} */
    const session = { device: null, tag: 0, unacked: new Map() };
    /** @type {any} */ (ws).session = session;
    ws.send(JSON.stringify({ type: "challenge", v: 1, edge: this.name, nonce: Buffer.from(nonce).toString("base64url") }));
    ws.on("message", (data, isBinary) => this.#frame(ws, session, nonce, data, isBinary).catch(() => ws.close(1011)));
    ws.on("close", (code) => {
      if (session.device) {
        this.#queue(session.device).unshift(...session.unacked.values()); // back, in order
        if (this.live.get(session.device) === ws) this.live.delete(session.device);
        else if (this.live.has(session.device)) this.#pump(/** @type {any} */ (this.live.get(session.device)));
      }
      this.#emit("close", code);
    });
  }

  /**
   * @param {import("ws").WebSocket} ws
   * @param {{device: string | null, tag: number, unacked: Map<number, Uint8Array>}} session
   * @param {Uint8Array} nonce
   * @param {import("ws").RawData} data
   * @param {boolean} isBinary
   */
  async #frame(ws, session, nonce, data, isBinary) {
    let frame;
    try {
      frame = isBinary ? null : JSON.parse(data.toString());
    } catch {
      frame = null;
    }
    if (frame === null || typeof frame !== "object") return ws.close(4400, "bad_frame");
    this.frames.push(frame);
    this.#emit("frame", frame);
    if (session.device === null) return this.#login(ws, session, nonce, frame);
    if (frame.type === "send") {
      const send = { device: session.device, ref: frame.ref, kid: frame.kid, sealed: new Uint8Array(Buffer.from(frame.sealed, "base64url")) };
      this.sends.push(send);
      this.#emit("send", send);
      const answer = await this.answer(send);
      if (answer && ws.readyState === OPEN) ws.send(JSON.stringify({ ...answer, ref: frame.ref }));
    } else if (frame.type === "ping") {
      this.#emit("ping", frame.ref);
      if (!this.silent) ws.send(JSON.stringify({ type: "pong", ref: frame.ref }));
    } else if (frame.type === "received") {
      if (!session.unacked.has(frame.tag)) return ws.close(4400, "bad_frame");
      if (this.ignoreReceived) return this.#emit("received", frame.tag);
      session.unacked.delete(frame.tag);
      this.#emit("received", frame.tag);
      this.#pump(ws);
    } else {
      ws.close(4400, "bad_frame");
    }
  }

  /**
   * @param {import("ws").WebSocket} ws
   * @param {{device: string | null, tag: number, unacked: Map<number, Uint8Array>}} session
   * @param {Uint8Array} nonce
   * @param {any} frame
   */
  async #login(ws, session, nonce, frame) {
    if (frame.type !== "login") return ws.close(4400, "bad_frame");
    const key = this.devices.get(frame.device);
    const signed = Buffer.concat([Buffer.from(`relayd/v1 edge-login\n${this.name}\n${frame.device}\n`), nonce]);
    const good = key !== undefined && await crypto.subtle.verify("Ed25519",
      await crypto.subtle.importKey("raw", key, "Ed25519", false, ["verify"]),
      Buffer.from(String(frame.sig), "base64url"), signed);
    this.#emit("login", good);
    if (!good) {
      ws.send(JSON.stringify({ type: "refused", code: "login_failed" }));
      return ws.close(4401, "login_failed");
    }
    this.logins += 1;
    this.live.get(frame.device)?.close(4409, "replaced");
    session.device = frame.device;
    this.live.set(frame.device, ws);
    ws.send(JSON.stringify({ type: "ready", v: 1 }));
    this.#pump(ws);
  }

  /** @param {import("ws").WebSocket} ws */
  #pump(ws) {
    const session = /** @type {any} */ (ws).session;
    const queue = this.#queue(session.device);
    while (queue.length > 0 && session.unacked.size < this.maxUnacked && ws.readyState === OPEN) {
      const sealed = /** @type {Uint8Array} */ (queue.shift());
      session.tag += 1;
      session.unacked.set(session.tag, sealed);
      ws.send(JSON.stringify({ type: "deliver", tag: session.tag, sealed: Buffer.from(sealed).toString("base64url") }));
    }
  }
}
