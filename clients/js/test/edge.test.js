// The EdgeClient against an edge that speaks the wire protocol over a real WebSocket on
// loopback: login, send with ack, receive with acknowledgement, reconnect and resume, and
// what it does with frames no edge should send.

import assert from "node:assert/strict";
import { afterEach, describe, it } from "node:test";
import fc from "fast-check";
import { WebSocket } from "ws";

import { DeviceKeys, DeviceState, EdgeClient, RelayPublic, SendError, openSealed, seal, verify } from "../src/index.js";
import { EdgeDouble } from "./edge-double.js";

const encoder = new TextEncoder();
/** @type {(() => Promise<unknown> | void)[]} */
let cleanups = [];
afterEach(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
  cleanups = [];
});

/** A relay (its HPKE and signing keys), a device, an edge that knows the device, a client. */
async function setup({ answer = undefined, edgeName = "edge-1", onMessage = undefined, state = undefined, ping = undefined } = {}) {
  const relayHpke = await DeviceKeys.generate("relay");
  const relaySigning = /** @type {CryptoKeyPair} */ (await crypto.subtle.generateKey("Ed25519", true, ["sign", "verify"]));
  const relay = new RelayPublic("r2026-11", "X25519", relayHpke.encPublic, new Uint8Array(await crypto.subtle.exportKey("raw", relaySigning.publicKey)));
  const keys = await DeviceKeys.generate("web-1");
  const edge = await EdgeDouble.start({ devices: new Map([["web-1", keys.signPublic]]), ...(answer ? { answer } : {}) });
  /** @type {import("../src/payload.js").Down[]} */
  const received = [];
  const client = new EdgeClient({
    url: edge.url, keys, relay, WebSocket: /** @type {any} */ (WebSocket), edgeName, state, ping,
    backoff: { first: 5, max: 50 },
    onMessage: onMessage ?? ((message) => { received.push(message); }),
  });
  /** @type {{what: string, code: string}[]} */
  const problems = [];
  client.addEventListener("problem", (event) => problems.push(/** @type {CustomEvent} */ (event).detail));
  cleanups.push(() => edge.close(), () => client.stop());

  /** Open an up message as the relay would: HPKE, then the device's signature. */
  async function openUp(/** @type {Uint8Array} */ sealed) {
    const { signature, payload } = await openSealed(sealed, { direction: "up", kid: relay.kid, kem: "X25519", recipientKey: await relayHpke.recipientKey() });
    await verify(signature, payload, { direction: "up", signer: await crypto.subtle.importKey("raw", keys.signPublic, "Ed25519", false, ["verify"]) });
    return JSON.parse(new TextDecoder().decode(payload));
  }

  /** A down message sealed and signed as the relay does. */
  function sealDown(/** @type {number} */ seq, text = `reply ${seq}`) {
    const payload = encoder.encode(JSON.stringify({ v: 1, device: "web-1", seq, ts: Date.now(), id: crypto.randomUUID(), from: "acme", type: "message", body: { text } }));
    return seal(payload, { direction: "down", kid: "web-1", kem: "X25519", recipient: keys.encPublic, signer: relaySigning.privateKey });
  }

  return { edge, client, keys, relay, received, problems, openUp, sealDown };
}

/**
 * The next time `client` reaches `status`, or a failure after `ms`.
 * @param {EdgeClient} client
 * @param {string} status
 */
function reaches(client, status, ms = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`not ${status} within ${ms} ms (${client.status})`)), ms);
    client.addEventListener("status", function listener(event) {
      const { detail } = /** @type {CustomEvent} */ (event);
      if (detail.status !== status) return;
      clearTimeout(timer);
      client.removeEventListener("status", listener);
      resolve(detail);
    });
  });
}

/**
 * Resolves when `check()` is true, checked after each of the edge's events of `kind`.
 * @param {EdgeDouble} edge
 * @param {string} kind
 * @param {() => boolean} check
 */
async function until(edge, kind, check) {
  while (!check()) await edge.next(kind);
}

describe("EdgeClient", () => {
  it("logs in and sends with ack: sealed up, in order, with seq counting from the state's", async () => {
    const { edge, client, openUp } = await setup({ state: new DeviceState({ snapshot: { seq: 41, high: 0, seen: [] } }) });
    client.start();
    const sent = await Promise.all([
      client.send("acme", "start", { text: "Hello" }),
      client.send("acme", "typing_start"),
      client.send("acme", "message", { text: "Where is my order?" }),
    ]);
    assert.deepEqual(sent.map((s) => s.seq), [42, 43, 44]);
    assert.equal(edge.logins, 1);
    const opened = await Promise.all(edge.sends.map((s) => openUp(s.sealed)));
    assert.deepEqual(opened.map((up) => [up.seq, up.type, up.id, up.to, up.device]), sent.map((s, i) => [s.seq, ["start", "typing_start", "message"][i], s.id, "acme", "web-1"]));
    assert.deepEqual(edge.sends.map((s) => s.kid), ["r2026-11", "r2026-11", "r2026-11"]);
    assert.ok(opened.every((up) => Math.abs(up.ts - Date.now()) < 60_000));
  });

  it("refuses, before anything is sent, a message the relay would dead-letter", async () => {
    const { edge, client } = await setup();
    assert.throws(() => client.send("acme", "delete"), TypeError);
    assert.throws(() => client.send("not a business", "read"), TypeError);
    assert.throws(() => client.send("acme", "message", { text: "hi" }, { id: "42" }), TypeError);
    assert.equal(edge.sends.length, 0);
  });

  it("hands each down message to onMessage in order, and acknowledges it only once that returns", async () => {
    /** @type {(value?: unknown) => void} */
    let release = () => {};
    const gate = new Promise((resolve) => { release = resolve; });
    /** @type {number[]} */
    const handled = [];
    const { edge, client, sealDown } = await setup({
      onMessage: async (message) => {
        if (message.seq === 1) await gate;
        handled.push(message.seq);
      },
    });
    for (const seq of [1, 2, 3]) edge.deliver("web-1", await sealDown(seq));
    client.start();
    await reaches(client, "ready");
    await until(edge, "frame", () => edge.frames.length >= 1); // the login
    assert.deepEqual(edge.frames.filter((f) => /** @type {any} */ (f).type === "received"), []);
    release();
    await until(edge, "received", () => edge.frames.filter((f) => /** @type {any} */ (f).type === "received").length === 3);
    assert.deepEqual(handled, [1, 2, 3]);
    assert.deepEqual(edge.frames.filter((f) => /** @type {any} */ (f).type === "received").map((f) => /** @type {any} */ (f).tag), [1, 2, 3]);
  });

  it("after a dropped connection, logs in again, sends again what had no ack with a new seq and the same id, and takes each redelivery once", async () => {
    let answering = false;
    const { edge, client, sealDown, received, openUp } = await setup({ answer: () => (answering ? { type: "ack" } : null) });
    edge.ignoreReceived = true; // the deliveries stay unacked on the first connection
    edge.deliver("web-1", await sealDown(1));
    edge.deliver("web-1", await sealDown(2));
    client.start();
    const sending = client.send("acme", "message", { text: "are you there?" });
    await until(edge, "send", () => edge.sends.length === 1);
    await until(edge, "received", () => edge.frames.filter((f) => /** @type {any} */ (f).type === "received").length === 2);
    answering = true;
    edge.ignoreReceived = false;
    edge.dropAll();
    const sent = await sending;
    await until(edge, "received", () => edge.frames.filter((f) => /** @type {any} */ (f).type === "received").length === 4);
    assert.equal(edge.logins, 2);
    const [first, second] = await Promise.all(edge.sends.map((s) => openUp(s.sealed)));
    assert.equal(first.id, second.id);
    assert.equal(sent.id, first.id);
    assert.deepEqual([first.seq, second.seq, sent.seq], [1, 2, 2]);
    assert.deepEqual(received.map((m) => m.seq), [1, 2]); // each once, though delivered twice
    assert.equal(edge.queues.get("web-1")?.length, 0);
  });

  it("sends again after a nack that says later, and rejects on one that is final", async () => {
    const answers = [{ type: "nack", code: "rate_limited" }, { type: "nack", code: "unavailable" }, { type: "ack" }, { type: "nack", code: "too_large" }];
    const { edge, client, openUp } = await setup({ answer: () => answers.shift() ?? null });
    client.start();
    const sent = await client.send("acme", "message", { text: "hi" });
    await assert.rejects(client.send("acme", "message", { text: "big" }), (error) => error instanceof SendError && error.code === "too_large");
    const ups = await Promise.all(edge.sends.map((s) => openUp(s.sealed)));
    assert.deepEqual(ups.map((up) => up.seq), [1, 2, 3, 4]);
    assert.deepEqual(ups.slice(0, 3).map((up) => up.id), [sent.id, sent.id, sent.id]);
    assert.equal(sent.seq, 3);
    assert.equal(edge.logins, 1);
  });

  it("stops for good when the edge refuses the login, and rejects what was waiting", async () => {
    const { edge, client } = await setup();
    edge.devices.clear();
    const stopped = reaches(client, "stopped");
    client.start();
    const sending = client.send("acme", "read");
    assert.equal((/** @type {any} */ (await stopped)).reason, "login_failed");
    await assert.rejects(sending, (error) => error instanceof SendError && error.code === "stopped");
    await assert.rejects(client.ready(), SendError);
    assert.equal(edge.logins, 0);
  });

  it("stops when another connection of the same device replaces it", async () => {
    const { edge, client, keys, relay } = await setup();
    client.start();
    await client.ready();
    const other = new EdgeClient({ url: edge.url, edgeName: "edge-1", keys, relay, WebSocket: /** @type {any} */ (WebSocket), onMessage: () => {} });
    cleanups.push(() => other.stop());
    const stopped = reaches(client, "stopped");
    other.start();
    await other.ready();
    assert.equal((/** @type {any} */ (await stopped)).reason, "replaced");
    assert.equal(other.status, "ready");
  });

  it("does not log in to an edge of another name", async () => {
    const { edge, client } = await setup({ edgeName: "edge-2" });
    const stopped = reaches(client, "stopped");
    client.start();
    assert.equal((/** @type {any} */ (await stopped)).reason, "wrong_edge");
    assert.deepEqual(edge.frames, []);
  });

  it("acknowledges a delivery that does not open, without handing it on", async () => {
    const { edge, client, received, problems, sealDown } = await setup();
    edge.deliver("web-1", crypto.getRandomValues(new Uint8Array(200)));
    edge.deliver("web-1", await sealDown(5));
    client.start();
    await until(edge, "received", () => edge.frames.filter((f) => /** @type {any} */ (f).type === "received").length === 2);
    assert.deepEqual(received.map((m) => m.seq), [5]);
    assert.deepEqual(problems, [{ what: "undeliverable", code: "decrypt_failed" }]);
  });

  it("closes with 4400 and logs in again after any frame no edge should send", async () => {
    const { edge, client, received, problems, sealDown } = await setup();
    client.start();
    await client.ready();
    const frames = fc.oneof(
      fc.string(),
      fc.json().filter((text) => { const v = JSON.parse(text); return v === null || typeof v !== "object" || Array.isArray(v) || !["ack", "nack", "deliver"].includes(v.type); }),
      fc.constantFrom('{"type":"challenge","v":1,"edge":"edge-1","nonce":"AA"}', '{"type":"ack","ref":99}', '{"type":"deliver","tag":0,"sealed":"AA"}',
        '{"type":"deliver","tag":1,"sealed":"not base64url"}', '{"type":"deliver","tag":1.5,"sealed":"AA"}', '{"type":"ready","v":1}'),
      fc.uint8Array({ minLength: 1, maxLength: 64 }),
    );
    await fc.assert(fc.asyncProperty(frames, async (frame) => {
      const closed = edge.next("close");
      const again = reaches(client, "ready");
      edge.raw("web-1", frame);
      assert.equal(await closed, 4400);
      await again;
    }), { numRuns: 40 });
    edge.deliver("web-1", await sealDown(1));
    await until(edge, "received", () => edge.frames.some((f) => /** @type {any} */ (f).type === "received"));
    assert.deepEqual(received.map((m) => m.seq), [1]);
    assert.ok(problems.length >= 40 && problems.every((p) => p.what === "bad_frame"));
  });

  it("sends one message at a time, so a refused one is not overtaken", async () => {
    const answers = [{ type: "nack", code: "broker_full" }, { type: "ack" }, { type: "ack" }];
    const { edge, client, openUp } = await setup({ answer: () => answers.shift() ?? null });
    client.start();
    const [first, second] = await Promise.all([client.send("acme", "start", { text: "one" }), client.send("acme", "message", { text: "two" })]);
    const ups = await Promise.all(edge.sends.map((s) => openUp(s.sealed)));
    assert.deepEqual(ups.map((up) => [up.id, up.seq]), [[first.id, 1], [first.id, 2], [second.id, 3]]);
  });

  it("pings the edge, and gives up a connection whose pong does not come", async () => {
    const { edge, client, problems } = await setup({ ping: { interval: 1000 } });
    client.start();
    await client.ready();
    for (let i = 0; i < 2; i += 1) await edge.next("ping");
    assert.equal(edge.logins, 1); // answered pings keep the connection
    edge.silent = true;
    const closed = edge.next("close");
    await reaches(client, "waiting");
    await closed;
    edge.silent = false;
    await reaches(client, "ready");
    assert.equal(edge.logins, 2);
    assert.ok(problems.some((p) => p.what === "no_pong"));
  });

  it("rejects what is in flight when stopped", async () => {
    const { edge, client } = await setup({ answer: () => null });
    client.start();
    const sending = client.send("acme", "read");
    await until(edge, "send", () => edge.sends.length === 1);
    client.stop();
    await assert.rejects(sending, (error) => error instanceof SendError && error.code === "stopped");
    await assert.rejects(client.send("acme", "read"), SendError);
  });
});
