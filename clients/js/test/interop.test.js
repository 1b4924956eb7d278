// Interop with relayd, both ways and for both KEMs: the SDK seals and relayd opens,
// verifies and validates; relayd seals and the SDK opens and verifies.

import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { DeviceKeys, EnvelopeError, RelayPublic, b64uDecode, b64uEncode, upPayload } from "../src/index.js";
import { noPeer, relayd } from "./peer.js";

const KEMS = /** @type {const} */ (["X25519", "MLKEM768_X25519"]);

for (const kem of KEMS) {
  describe(`interop with relayd, ${kem}`, { skip: noPeer }, () => {
    it("relayd opens, verifies and validates what the SDK sealed up", async () => {
      const [relay] = relayd([{ op: "relay", kem, kid: "r2026-11" }]);
      const keys = await DeviceKeys.generate("web-1");
      const ups = [
        { type: "start", body: { intent: "order-status", text: "Où est ma commande ? 📦" } },
        { type: "message", body: { text: "x".repeat(10_000) } },
        { type: "typing_start", body: {} },
        { type: "close", body: {} },
      ];
      const requests = [];
      for (const [i, up] of ups.entries()) {
        const payload = upPayload({ device: "web-1", seq: i + 1, ts: Date.now(), id: crypto.randomUUID(), to: "acme", ...up });
        const sealed = await keys.sealUp(RelayPublic.fromJSON(relay.public), payload);
        requests.push({ op: "open_up", relay, sign_key: b64uEncode(keys.signPublic), sealed: b64uEncode(sealed) });
      }
      const answers = relayd(requests);
      assert.deepEqual(answers.map((a) => a.error), ups.map(() => undefined));
      assert.deepEqual(answers.map((a) => [a.up.seq, a.up.type, a.up.body]), ups.map((up, i) => [i + 1, up.type, up.body]));
    });

    it("relayd refuses what the SDK signed with another device's key", async () => {
      const [relay] = relayd([{ op: "relay", kem, kid: "r2026-11" }]);
      const keys = await DeviceKeys.generate("web-1");
      const other = await DeviceKeys.generate("web-1");
      const payload = upPayload({ device: "web-1", seq: 1, ts: Date.now(), id: crypto.randomUUID(), to: "acme", type: "read", body: {} });
      const sealed = await other.sealUp(RelayPublic.fromJSON(relay.public), payload);
      const [answer] = relayd([{ op: "open_up", relay, sign_key: b64uEncode(keys.signPublic), sealed: b64uEncode(sealed) }]);
      assert.equal(answer.error, "bad_signature");
    });

    it("the SDK opens and verifies what relayd sealed down to its registered key", async () => {
      const keys = await DeviceKeys.generate("web-1", { kem });
      const registration = keys.registration("alice@example.org");
      const [relay, ...downs] = relayd([{ op: "relay", kem: "X25519", kid: "r2026-11" }]);
      const messages = [
        { seq: 1, type: "typing_start", body: {} },
        { seq: 2, type: "message", body: { text: "It ships tomorrow. 🚚" } },
        { seq: 7, type: "echo", body: { type: "start", body: { text: "hi" } } },
      ];
      const sealed = relayd(messages.map((m) => ({
        op: "seal_down", relay, device: "web-1", kem: registration.kem, enc_key: registration.enc_key,
        id: crypto.randomUUID(), from: "acme", ...m,
      })));
      assert.equal(downs.length, 0);
      const publicRelay = RelayPublic.fromJSON(relay.public);
      for (const [i, { sealed: body, payload }] of sealed.entries()) {
        const opened = await keys.openDown(publicRelay, b64uDecode(body));
        assert.deepEqual(opened, JSON.parse(payload));
        assert.deepEqual([opened.seq, opened.type, opened.body, opened.from], [messages[i].seq, messages[i].type, messages[i].body, "acme"]);
      }
    });

    it("the SDK refuses a down message relayd sealed to another device id", async () => {
      const keys = await DeviceKeys.generate("web-1", { kem });
      const { kem: k, enc_key } = keys.registration("alice@example.org");
      const [relay] = relayd([{ op: "relay", kem: "X25519", kid: "r2026-11" }]);
      const [{ sealed }] = relayd([{ op: "seal_down", relay, device: "web-2", kem: k, enc_key, seq: 1, id: crypto.randomUUID(), from: "acme", type: "read", body: {} }]);
      await assert.rejects(keys.openDown(RelayPublic.fromJSON(relay.public), b64uDecode(sealed)),
        (error) => error instanceof EnvelopeError && error.code === "decrypt_failed");
    });
  });
}

describe("keys a program keeps in a file", { skip: noPeer }, () => {
  for (const kem of KEMS) {
    it(`come back from their secrets and still open relayd's messages (${kem})`, async () => {
      const keys = await DeviceKeys.generate("web-1", { kem, extractable: true });
      const again = await DeviceKeys.fromSecrets(await keys.secrets());
      assert.deepEqual([again.encPublic, again.signPublic], [keys.encPublic, keys.signPublic]);
      const [relay] = relayd([{ op: "relay", kem: "X25519", kid: "r2026-11" }]);
      const [{ sealed }] = relayd([{ op: "seal_down", relay, device: "web-1", kem, enc_key: b64uEncode(keys.encPublic), seq: 3, id: crypto.randomUUID(), from: "acme", type: "read", body: {} }]);
      assert.equal((await again.openDown(RelayPublic.fromJSON(relay.public), b64uDecode(sealed))).seq, 3);
    });
  }

  it("are non-extractable unless asked for", async () => {
    const keys = await DeviceKeys.generate("web-1");
    assert.equal(/** @type {CryptoKey} */ (keys.signPrivate).extractable, false);
    assert.equal(/** @type {CryptoKey} */ (keys.encPrivate).extractable, false);
    await assert.rejects(keys.secrets());
  });
});
