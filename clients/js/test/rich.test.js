// Rich conversations (docs/protocol.md section 13) in the SDK: every body is judged as
// relayd judges it (fast-check mutations of the contract's examples, each judged by both),
// the builders make what relayd takes, and both directions go through relayd's own code.

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";

import {
  DeviceKeys, RelayPublic, b64uDecode, b64uEncode, bodyProblem, interactive, message, parseBody, reaction, response, upPayload,
} from "../src/index.js";
import { noPeer, relayd } from "./peer.js";

const ID = "27df3b48-e714-445a-a95f-59dbc340f316";
const REFERENCE = { url: "https://files.acme.example/i/tea", key: "Vx3k9Q", sha256: "5891b5", size: 10342, mime: "image/jpeg" };
const THUMBNAIL = { data: "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==", mime: "image/png" };

/** Valid bodies of the contract, with the sender that may send them. */
const VALID = [
  { type: "start", sender: "user", body: { intent: "order-status", group: "g", text: "Where is my order?" } },
  { type: "message", sender: "user", body: { text: "Perfect, thanks! 😀", reply_to: ID } },
  { type: "message", sender: "user", body: { attachments: [REFERENCE, { ...THUMBNAIL, name: "a.png" }] } },
  { type: "message", sender: "business", body: { text: "Sunday?", quick_reply: { options: [{ id: "yes", title: "Yes" }, { id: "no", title: "No, thanks" }] } } },
  {
    type: "message", sender: "business", body: {
      text: "What would you like?", reply_to: ID, list_picker: {
        title: "Menu", multiple: true, sections: [
          { title: "Drinks", items: [{ id: "tea", title: "Tea", subtitle: "Earl Grey", image: REFERENCE }, { id: "coffee", title: "Coffee" }] },
          { items: [{ id: "cake", title: "Cake" }] },
        ],
      },
    },
  },
  { type: "message", sender: "business", body: { text: "When?", time_picker: { title: "Sunday delivery", timezone: "America/Argentina/Buenos_Aires", slots: [{ id: "sun-10", start: 1796547600000, duration: 3600 }, { id: "sun:14", start: 0, duration: 86400 }] } } },
  { type: "message", sender: "business", body: { text: "On its way", rich_link: { url: "https://acme.example/track/1234?a=b#c", title: "Track order 1234", image: THUMBNAIL } } },
  { type: "response", sender: "user", body: { message_id: ID, selected: ["tea", "cake"] } },
  { type: "reaction", sender: "user", body: { message_id: ID, emoji: "👨‍👩‍👧‍👦" } },
  { type: "reaction", sender: "business", body: { message_id: ID, emoji: "❤️", remove: true } },
  { type: "typing_start", sender: "user", body: {} },
];

/** Values that sit at the edges of the rules. */
const EDGE_VALUES = [
  null, true, false, 0, -1, 1, 1.5, 2, 5, 6, 64, 65, 86400, 86401, 2 ** 53 - 1, "", "a", "x".repeat(64), "x".repeat(65),
  "y".repeat(256), "y".repeat(257), "😀".repeat(64), "😀".repeat(65), ID, ID.toUpperCase(), "👍", "1️⃣", "🇫🇷", "ok", "1", "👍 ",
  "👍".repeat(16), "👍".repeat(17), "https://a.example/x", "http://a.example", "https://a.example/ x", "Europe/Paris", "europe/paris/x/y",
  "image/png", "text/plain", "ab==", "abc", "a===", "-_", [], [1], {}, { id: "a", title: "A" },
];

const pathOf = (/** @type {unknown} */ value, /** @type {(string|number)[]} */ path = []) => {
  /** @type {(string|number)[][]} */
  const out = [path];
  if (Array.isArray(value)) value.forEach((v, i) => out.push(...pathOf(v, [...path, i])));
  else if (value && typeof value === "object") for (const [k, v] of Object.entries(value)) out.push(...pathOf(v, [...path, k]));
  return out;
};

/** One change to one place of a valid body: delete it, replace it, add a key, repeat an element. */
const mutated = fc.constantFrom(...VALID).chain(({ type, sender, body }) => {
  const paths = pathOf(body);
  return fc.tuple(
    fc.constantFrom(...paths), fc.constantFrom("delete", "replace", "add", "repeat", "grow"), fc.constantFrom(...EDGE_VALUES),
    fc.constantFrom("user", "business"),
  ).map(([path, how, value, who]) => {
    const copy = structuredClone(body);
    const parent = /** @type {any} */ (path.slice(0, -1).reduce((/** @type {any} */ node, key) => node[key], copy));
    const key = path.at(-1);
    const target = path.length ? parent[/** @type {string} */ (key)] : copy;
    if (how === "delete" && path.length) Array.isArray(parent) ? parent.splice(Number(key), 1) : delete parent[/** @type {string} */ (key)];
    else if (how === "replace" && path.length) parent[/** @type {string} */ (key)] = value;
    else if (how === "add" && target && typeof target === "object" && !Array.isArray(target)) target.extra = value;
    else if (how === "repeat" && Array.isArray(target) && target.length) target.push(structuredClone(target[0]));
    else if (how === "grow" && Array.isArray(target) && target.length) target.push(...Array.from({ length: 100 }, (_, i) => ({ ...structuredClone(target[0]), id: `n${i}` })));
    return { type, sender: who === "user" ? sender : who, body: copy };
  });
});

describe("rich bodies", () => {
  it("every valid body of the contract is taken, from its sender", () => {
    for (const { type, sender, body } of VALID) assert.equal(bodyProblem(type, body, /** @type {any} */ (sender)), null, JSON.stringify(body));
  });

  it("a device may not send an interactive message", () => {
    for (const { type, body } of VALID.filter((v) => v.sender === "business" && v.type === "message")) {
      assert.notEqual(bodyProblem(type, body, "user"), null);
      assert.throws(() => upPayload({ device: "web-1", seq: 1, ts: 0, id: crypto.randomUUID(), to: "acme", type, body }), TypeError);
    }
  });

  it("judges every body as relayd does: the examples, and one change to any place of them", { skip: noPeer }, () => {
    const cases = [...VALID, ...fc.sample(mutated, { numRuns: 4000, seed: 22 })];
    const answers = relayd(cases.map((c) => ({ op: "problem", ...c })));
    const ours = cases.map(({ type, body, sender }) => bodyProblem(type, body, /** @type {any} */ (sender)) === null);
    const theirs = answers.map((a) => a.problem === null);
    const differ = cases.filter((_, i) => ours[i] !== theirs[i]).slice(0, 3);
    assert.deepEqual(differ, [], "bodies judged differently");
    assert.ok(ours.filter(Boolean).length > VALID.length && ours.includes(false), "both verdicts occur");
  });

  it("builds what relayd takes, and refuses what it would not", () => {
    assert.deepEqual(response(ID, ["tea"]), { message_id: ID, selected: ["tea"] });
    assert.deepEqual(reaction(ID, "👍", { remove: true }), { message_id: ID, emoji: "👍", remove: true });
    assert.deepEqual(message("hi", { replyTo: ID }), { text: "hi", reply_to: ID });
    assert.throws(() => response(ID, ["tea", "tea"]), TypeError);
    assert.throws(() => response(ID.toUpperCase(), ["tea"]), TypeError);
    assert.throws(() => reaction(ID, "ok"), TypeError);
    assert.throws(() => interactive("quick_reply", "pick", { options: [{ id: "a", title: "A" }] }), TypeError);
  });

  it("parses what arrives: which picker, the answer, the reaction", () => {
    const [quick, list, time, link] = VALID.filter((v) => v.sender === "business" && v.type === "message");
    assert.equal(parseBody("message", quick.body, "business")?.kind, "quick_reply");
    assert.deepEqual(parseBody("message", list.body, "business"), { kind: "list_picker", text: "What would you like?", replyTo: ID, value: list.body.list_picker });
    assert.equal(parseBody("message", time.body, "business")?.kind, "time_picker");
    assert.equal(parseBody("message", link.body, "business")?.kind, "rich_link");
    assert.deepEqual(parseBody("response", { message_id: ID, selected: ["a"] }, "user"), { kind: "response", messageId: ID, selected: ["a"] });
    assert.deepEqual(parseBody("reaction", { message_id: ID, emoji: "👍" }, "business"), { kind: "reaction", messageId: ID, emoji: "👍", remove: false });
    assert.equal(parseBody("message", { text: "plain" }, "business"), null);
    assert.throws(() => parseBody("message", { text: "x", quick_reply: {} }, "business"), TypeError);
  });

  it("relayd opens a response and a reaction the SDK sealed; the SDK opens what relayd sealed", { skip: noPeer }, async () => {
    const [relay] = relayd([{ op: "relay", kem: "X25519", kid: "r1" }]);
    const publicRelay = RelayPublic.fromJSON(relay.public);
    const keys = await DeviceKeys.generate("web-1");
    const ups = [{ type: "response", body: response(ID, ["tea", "cake"]) }, { type: "reaction", body: reaction(ID, "🇫🇷", { remove: true }) }, { type: "message", body: message("yes", { replyTo: ID }) }];
    const requests = [];
    for (const [i, up] of ups.entries()) {
      const sealed = await keys.sealUp(publicRelay, upPayload({ device: "web-1", seq: i + 1, ts: Date.now(), id: crypto.randomUUID(), to: "acme", ...up }));
      requests.push({ op: "open_up", relay, sign_key: b64uEncode(keys.signPublic), sealed: b64uEncode(sealed) });
    }
    assert.deepEqual(relayd(requests).map((a) => a.up?.body ?? a.error), ups.map((up) => up.body));

    const { enc_key: encKey, kem } = keys.registration("alice@example.org");
    const downs = [...VALID.filter((v) => v.sender === "business"), { type: "echo", body: { type: "response", body: response(ID, ["tea"]) } }];
    const sealed = relayd(downs.map((d, i) => ({ op: "seal_down", relay, device: "web-1", kem, enc_key: encKey, seq: i + 1, id: crypto.randomUUID(), from: "acme", type: d.type, body: d.body })));
    for (const [i, { sealed: body }] of sealed.entries()) {
      const opened = await keys.openDown(publicRelay, b64uDecode(body));
      assert.deepEqual([opened.type, opened.body], [downs[i].type, downs[i].body]);
    }
  });
});
