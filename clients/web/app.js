// The chat page: one device, its keys in IndexedDB, talking to the edge with the SDK.
//
// Configuration comes from config.json beside the page (or ?config=URL):
//   {"edge_url": "wss://…/v1/device", "edge_name": "edge-1",
//    "relay": <the JSON of `relayd keys show`>, "kem": "X25519" (optional),
//    "businesses": [{"id": "acme", "name": "Acme"}],
//    "enrol_url": "/enrol" (optional: where the page posts its public keys once, and
//                            waits for a 2xx before it logs in)}
//
// Keys: the Ed25519 key and the X25519 HPKE key are WebCrypto keys made non-extractable,
// stored in IndexedDB as CryptoKey objects: script on this page can use them, but not
// read them out. With "kem": "MLKEM768_X25519" the HPKE key is an X-Wing seed stored as
// bytes, because WebCrypto has no ML-KEM.
//
// What the business sends is shown as text, never as markup (textContent only). Nothing
// named in a message is fetched: a rich link opens only when the user clicks it, and only
// an inline thumbnail is shown (the page's Content-Security-Policy allows images from
// data: URLs alone, so no image URL could be loaded even by mistake).

import { DeviceKeys, DeviceState, EdgeClient, RelayPublic, message as messageBody, parseBody, reaction, response } from "relayd-device";
import * as store from "./store.js";

const TYPING_IDLE_MS = 3000;
const EMOJI = ["👍", "❤️"];
const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const ui = {
  status: $("status"), business: /** @type {HTMLSelectElement} */ ($("business")), remove: /** @type {HTMLButtonElement} */ ($("delete")),
  messages: $("messages"), typing: $("typing"), notice: $("notice"), composer: /** @type {HTMLFormElement} */ ($("composer")),
  text: /** @type {HTMLInputElement} */ ($("text")), send: /** @type {HTMLButtonElement} */ ($("send")), registration: $("registration"),
  replying: $("replying"), replyingText: $("replying-text"), replyCancel: /** @type {HTMLButtonElement} */ ($("reply-cancel")),
};

/**
 * @typedef {{kind: string, value: Record<string, any>}} Picker
 * @typedef {{id: string, from: "me" | "business", text: string, state?: "sending" | "sent" | "read" | "failed",
 *   replyTo?: string, picker?: Picker, answered?: string[], reactions: {me: string[], business: string[]}}} Line
 * @typedef {{open: boolean, messages: Line[], unread: number}} Conversation
 */
/** @type {Map<string, Conversation>} */
const conversations = new Map();
/** @type {Map<string, string>} */
const names = new Map();
let typing = false;
/** @type {ReturnType<typeof setTimeout> | undefined} */
let typingTimer;
/** @type {string | undefined} the message the composer answers */
let replyTo;

const config = await (await fetch(new URLSearchParams(location.search).get("config") ?? "config.json")).json();
const relay = RelayPublic.fromJSON(config.relay);
const keys = await loadKeys(config.kem ?? "X25519");
const state = new DeviceState({
  snapshot: (await store.get("device", "state")) ?? undefined,
  save: (snapshot) => store.put("device", "state", snapshot),
});
ui.registration.textContent = JSON.stringify(registration(), null, 2);
ui.registration.dataset.device = keys.device;

for (const { id, name } of config.businesses) {
  names.set(id, name ?? id);
  ui.business.add(new Option(name ?? id, id));
}
for (const id of names.keys()) {
  const kept = (await store.get("conversations", id)) ?? empty();
  for (const m of kept.messages) m.reactions ??= { me: [], business: [] }; // kept by an older page
  conversations.set(id, kept);
}

const client = new EdgeClient({ url: config.edge_url, edgeName: config.edge_name, keys, relay, state, onMessage });
client.addEventListener("status", (event) => {
  const { status, reason } = /** @type {CustomEvent} */ (event).detail;
  ui.status.dataset.state = status;
  ui.status.textContent = { idle: "starting…", connecting: "connecting…", ready: "online", waiting: "offline, retrying…", stopped: `stopped (${reason})` }[/** @type {string} */ (status)] ?? status;
});
client.addEventListener("problem", (event) => console.warn("relayd:", /** @type {CustomEvent} */ (event).detail));

ui.business.addEventListener("change", () => { stopTyping(false); setReplyTo(undefined); render(); markRead(); });
ui.text.addEventListener("input", onInput);
ui.composer.addEventListener("submit", (event) => { event.preventDefault(); sendText(); });
ui.remove.addEventListener("click", deleteConversation);
ui.replyCancel.addEventListener("click", () => setReplyTo(undefined));
document.addEventListener("visibilitychange", markRead);
render();
if (await enrol()) client.start();

/** The device's keys from IndexedDB, or new ones on the first visit. */
async function loadKeys(/** @type {"X25519" | "MLKEM768_X25519"} */ kem) {
  const record = await store.get("device", "keys");
  if (record) return DeviceKeys.fromRecord(record);
  const id = [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");
  const fresh = await DeviceKeys.generate(`web-${id}`, { kem });
  await store.put("device", "keys", fresh.toRecord());
  return fresh;
}

/** What enrolment needs: the device id and its public keys (no user id: enrolment adds it). */
function registration() {
  const { device, kem, enc_key, sign_key } = keys.registration("");
  return { device, kem, enc_key, sign_key };
}

/** Post the public keys to `enrol_url`, if the site has one; whether to log in now. */
async function enrol() {
  if (!config.enrol_url) return true;
  ui.status.textContent = "enrolling this device…";
  try {
    const answer = await fetch(config.enrol_url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(registration()) });
    if (answer.ok) return true;
    ui.status.textContent = `enrolment refused (${answer.status})`;
  } catch {
    ui.status.textContent = "enrolment failed: reload to try again";
  }
  ui.status.dataset.state = "stopped";
  return false;
}

/** @returns {Conversation} */
function empty() {
  return { open: false, messages: [], unread: 0 };
}

function current() {
  return ui.business.value;
}

/** @param {string} business */
function conversation(business) {
  if (!conversations.has(business)) conversations.set(business, empty());
  return /** @type {Conversation} */ (conversations.get(business));
}

/** @param {string} business */
function save(business) {
  return store.put("conversations", business, conversation(business));
}

/**
 * An element with text (never markup) and data-test.
 * @param {string} tag @param {string} [text] @param {Record<string, string>} [data]
 */
function element(tag, text, data = {}) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  Object.assign(node.dataset, data);
  return node;
}

function render() {
  const talk = conversation(current());
  ui.messages.replaceChildren(...talk.messages.map((line) => renderLine(talk, line)));
  ui.send.textContent = talk.open ? "Send" : "Start conversation";
  ui.remove.disabled = !talk.open && talk.messages.length === 0;
}

/** @param {Conversation} talk @param {Line} line */
function renderLine(talk, line) {
  const item = element("li", undefined, { test: "message", id: line.id, from: line.from });
  if (line.state) item.dataset.state = line.state;
  if (line.replyTo) {
    const quoted = talk.messages.find((m) => m.id === line.replyTo);
    // No quote for a message this device does not have (docs/protocol.md section 13).
    if (quoted) item.append(element("blockquote", `${quoted.from === "me" ? "You" : names.get(current()) ?? "Them"}: ${quoted.text.split("\n")[0]}`, { test: "quote", of: quoted.id }));
  }
  item.append(element("span", line.text, { test: "content" }));
  if (line.picker) item.append(renderPicker(talk, line, line.picker));
  const reactions = element("div", undefined, { test: "reactions" });
  for (const side of /** @type {const} */ (["business", "me"])) {
    for (const emoji of line.reactions[side]) reactions.append(element("span", emoji, { test: "reaction", side, emoji }));
  }
  const actions = element("div", undefined, { test: "actions" });
  for (const emoji of EMOJI) {
    const mine = line.reactions.me.includes(emoji);
    const button = element("button", emoji, { test: "react", emoji, on: String(mine) });
    button.title = mine ? `take ${emoji} off` : `react with ${emoji}`;
    button.addEventListener("click", () => react(line, emoji, mine));
    actions.append(button);
  }
  const reply = element("button", "Reply", { test: "reply" });
  reply.addEventListener("click", () => setReplyTo(line.id));
  actions.append(reply);
  item.append(reactions, actions);
  return item;
}

/**
 * A quick reply, list picker, time picker or rich link, with what was answered.
 * @param {Conversation} talk @param {Line} line @param {Picker} picker
 */
function renderPicker(talk, line, { kind, value }) {
  const box = element("div", undefined, { test: kind });
  const closed = !talk.open || line.answered !== undefined;
  /** @param {string} label @param {string} id @param {Record<string, string>} data */
  const choice = (label, id, data) => {
    const button = element("button", label, data);
    button.disabled = closed;
    button.addEventListener("click", () => answer(line, [id]));
    return button;
  };
  if (kind === "quick_reply") {
    for (const option of value.options) box.append(choice(option.title, option.id, { test: "option", option: option.id }));
  } else if (kind === "list_picker") {
    box.append(element("strong", value.title));
    for (const section of value.sections) {
      const group = element("fieldset");
      if (section.title) group.append(element("legend", section.title));
      for (const it of section.items) {
        const label = `${it.title}${it.subtitle ? ` (${it.subtitle})` : ""}`;
        if (value.multiple) {
          const row = element("label", undefined, { test: "item", item: it.id });
          const tick = /** @type {HTMLInputElement} */ (element("input"));
          tick.type = "checkbox";
          tick.value = it.id;
          tick.disabled = closed;
          row.append(tick, ` ${label}`);
          group.append(row);
        } else {
          group.append(choice(label, it.id, { test: "item", item: it.id }));
        }
      }
      box.append(group);
    }
    if (value.multiple) {
      const done = element("button", "Choose", { test: "choose" });
      done.disabled = closed;
      done.addEventListener("click", () => {
        const ticked = [...box.querySelectorAll("input:checked")].map((input) => /** @type {HTMLInputElement} */ (input).value);
        if (ticked.length) answer(line, ticked);
      });
      box.append(done);
    }
  } else if (kind === "time_picker") {
    box.append(element("strong", value.title));
    const { format, note } = slotFormat(value.timezone);
    if (note) box.append(element("small", note));
    for (const slot of value.slots) {
      const button = choice(`${format.format(new Date(slot.start))} (${Math.round(slot.duration / 60)} min)`, slot.id, { test: "slot", slot: slot.id });
      button.disabled ||= slot.start < Date.now(); // shown, but a slot that has passed is not offered
      box.append(button);
    }
  } else if (kind === "rich_link") {
    const link = /** @type {HTMLAnchorElement} */ (element("a", undefined, { test: "link" }));
    link.href = value.url;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    link.referrerPolicy = "no-referrer";
    // Only an inline thumbnail: a referenced image would be a fetch the user did not ask for.
    if (value.image?.data) {
      const thumbnail = /** @type {HTMLImageElement} */ (element("img", undefined, { test: "thumbnail" }));
      thumbnail.src = `data:${value.image.mime};base64,${value.image.data}`;
      thumbnail.alt = "";
      link.append(thumbnail);
    }
    link.append(element("span", value.title), element("small", new URL(value.url).host));
    box.append(link);
  }
  if (line.answered) box.append(element("p", `You chose: ${line.answered.map((id) => titleOf(line.picker, id)).join(", ")}`, { test: "answered" }));
  return box;
}

/** How to show slot times: in the business's zone, or the device's when that is unknown. @param {string} timezone */
function slotFormat(timezone) {
  const options = /** @type {const} */ ({ weekday: "short", hour: "2-digit", minute: "2-digit", timeZoneName: "short" });
  try {
    return { format: new Intl.DateTimeFormat(undefined, { ...options, timeZone: timezone }), note: "" };
  } catch {
    return { format: new Intl.DateTimeFormat(undefined, options), note: `Times in this device's zone (${timezone} is unknown here).` };
  }
}

/** @param {Picker | undefined} picker @param {string} id */
function titleOf(picker, id) {
  const value = picker?.value ?? {};
  const all = [...(value.options ?? []), ...(value.sections ?? []).flatMap((/** @type {any} */ s) => s.items), ...(value.slots ?? [])];
  const found = all.find((c) => c.id === id);
  if (found?.title) return found.title;
  return found?.start !== undefined ? slotFormat(value.timezone).format.format(new Date(found.start)) : id;
}

/** @param {string} text */
function notice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = !text;
}

/** @param {string | undefined} id */
function setReplyTo(id) {
  replyTo = id;
  const quoted = id ? conversation(current()).messages.find((m) => m.id === id) : undefined;
  ui.replying.hidden = !quoted;
  ui.replyingText.textContent = quoted ? quoted.text.split("\n")[0] : "";
  if (quoted) ui.text.focus();
}

/**
 * One down message, stored before this returns (the SDK acknowledges it after).
 * @param {import("../js/src/payload.js").Down} message
 */
async function onMessage(message) {
  const business = message.from;
  const talk = conversation(business);
  const body = /** @type {Record<string, any>} */ (message.body);
  if (message.type === "typing_start" || message.type === "typing_end") {
    if (business === current()) {
      ui.typing.hidden = message.type === "typing_end";
      ui.typing.textContent = `${names.get(business) ?? business} is typing…`;
      if (message.type === "typing_start") ui.typing.dataset.seen = String(Number(ui.typing.dataset.seen ?? 0) + 1);
    }
    return;
  }
  if (message.type === "message") {
    talk.messages.push(line(message.id, "business", body, "business"));
    talk.unread += 1;
    if (business === current()) ui.typing.hidden = true;
  } else if (message.type === "reaction") {
    applyReaction(talk, "business", body);
  } else if (message.type === "read") {
    // "sending" too: the business may read a message before its ack reaches this page.
    for (const mine of talk.messages) if (mine.from === "me" && (mine.state === "sent" || mine.state === "sending")) mine.state = "read";
  } else if (message.type === "close") {
    talk.open = false;
    if (business === current()) notice("The conversation was closed.");
  } else if (message.type === "echo") {
    // Sent from another of the user's devices.
    const inner = body.body ?? {};
    if (body.type === "start" || body.type === "message") {
      talk.open = true;
      talk.messages.push({ ...line(message.id, "me", inner, "user"), state: "sent" });
    } else if (body.type === "response") {
      const target = talk.messages.find((m) => m.id === inner.message_id);
      if (target) target.answered = inner.selected; // a later answer replaces the mark
    } else if (body.type === "reaction") {
      applyReaction(talk, "me", inner);
    }
  } // any other type: from a later contract version; acknowledged, not shown
  await save(business);
  if (business === current()) render();
  markRead();
}

/**
 * A line of the conversation from a message body; an interactive key that does not parse
 * is left out, and the text shown as it is.
 * @param {string} id @param {"me" | "business"} from @param {Record<string, any>} body @param {"user" | "business"} sender
 * @returns {Line}
 */
function line(id, from, body, sender) {
  const files = Array.isArray(body.attachments) ? ` [${body.attachments.length} attachment(s)]` : "";
  /** @type {Line} */
  const made = { id, from, text: `${typeof body.text === "string" ? body.text : ""}${files}`, reactions: { me: [], business: [] } };
  if (typeof body.reply_to === "string") made.replyTo = body.reply_to;
  try {
    const parsed = parseBody("message", body, sender);
    if (parsed && "value" in parsed) made.picker = { kind: parsed.kind, value: parsed.value };
  } catch {
    // shown as its text, as a 1.0 app would
  }
  return made;
}

/**
 * A reaction from `side` on a message of the conversation (unknown messages: nothing).
 * @param {Conversation} talk @param {"me" | "business"} side @param {Record<string, any>} body
 */
function applyReaction(talk, side, body) {
  const target = talk.messages.find((m) => m.id === body.message_id);
  if (!target || typeof body.emoji !== "string") return;
  const others = target.reactions[side].filter((e) => e !== body.emoji);
  target.reactions[side] = body.remove === true ? others : [...others, body.emoji];
}

/** Tell the business its messages are read, when they are on screen. */
function markRead() {
  const business = current();
  const talk = conversation(business);
  if (document.visibilityState !== "visible" || talk.unread === 0 || !talk.open) return;
  talk.unread = 0;
  save(business);
  client.send(business, "read").catch((error) => console.warn("read receipt not sent:", error));
}

function onInput() {
  const business = current();
  if (!conversation(business).open) return; // no conversation yet to type in
  clearTimeout(typingTimer);
  if (ui.text.value === "") return stopTyping(true);
  if (!typing) {
    typing = true;
    client.send(business, "typing_start").catch(() => {});
  }
  typingTimer = setTimeout(() => stopTyping(true), TYPING_IDLE_MS);
}

/** @param {boolean} tell whether to send typing_end */
function stopTyping(tell) {
  clearTimeout(typingTimer);
  if (typing && tell) client.send(current(), "typing_end").catch(() => {});
  typing = false;
}

/**
 * Send an up message of this conversation; a notice if it fails.
 * @param {string} business @param {string} type @param {Record<string, unknown>} body @param {string} [id]
 */
async function send(business, type, body, id) {
  try {
    await client.send(business, type, body, id ? { id } : {});
    return true;
  } catch (error) {
    notice(`Not sent: ${error instanceof Error ? error.message : error}`);
    return false;
  }
}

async function sendText() {
  const text = ui.text.value.trim();
  if (!text) return;
  const business = current();
  const talk = conversation(business);
  stopTyping(talk.open);
  const type = talk.open ? "message" : "start";
  let body;
  try {
    body = type === "message" ? messageBody(text, { replyTo }) : { text };
  } catch (error) {
    return notice(`Not sent: ${error instanceof Error ? error.message : error}`);
  }
  const mine = /** @type {Line} */ ({ ...line(crypto.randomUUID(), "me", body, "user"), state: "sending" });
  talk.open = true;
  talk.messages.push(mine);
  ui.text.value = "";
  setReplyTo(undefined);
  notice("");
  await save(business);
  render();
  const sent = await send(business, type, body, mine.id);
  if (!sent) mine.state = "failed";
  else if (mine.state === "sending") mine.state = "sent";
  await save(business);
  if (business === current()) render();
}

/**
 * Answer an interactive message with the ids chosen; it shows as answered at once.
 * @param {Line} target @param {string[]} selected
 */
async function answer(target, selected) {
  const business = current();
  const previous = target.answered;
  target.answered = selected;
  render();
  if (!(await send(business, "response", response(target.id, selected)))) target.answered = previous;
  await save(business);
  render();
}

/**
 * Put `emoji` on a message, or take it off again.
 * @param {Line} target @param {string} emoji @param {boolean} remove
 */
async function react(target, emoji, remove) {
  const business = current();
  if (!conversation(business).open) return notice("The conversation is closed.");
  applyReaction(conversation(business), "me", { message_id: target.id, emoji, remove });
  render();
  if (!(await send(business, "reaction", reaction(target.id, emoji, { remove })))) {
    applyReaction(conversation(business), "me", { message_id: target.id, emoji, remove: !remove });
  }
  await save(business);
  render();
}

async function deleteConversation() {
  const business = current();
  stopTyping(false);
  if (conversation(business).open && !(await send(business, "close", {}))) return;
  conversations.set(business, empty());
  await save(business);
  notice("");
  setReplyTo(undefined);
  ui.typing.hidden = true;
  render();
  ui.remove.dataset.deleted = String(Number(ui.remove.dataset.deleted ?? 0) + 1);
}
