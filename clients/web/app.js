// The chat page: one device, its keys in IndexedDB, talking to the edge with the SDK.
//
// Configuration comes from config.json beside the page (or ?config=URL):
//   {"edge_url": "wss://…/v1/device", "edge_name": "edge-1" (optional),
//    "relay": <the JSON of `relayd keys show`>, "kem": "X25519" (optional),
//    "businesses": [{"id": "acme", "name": "Acme"}]}
//
// Keys: the Ed25519 key and the X25519 HPKE key are WebCrypto keys made non-extractable,
// stored in IndexedDB as CryptoKey objects: script on this page can use them, but not
// read them out. With "kem": "MLKEM768_X25519" the HPKE key is an X-Wing seed stored as
// bytes, because WebCrypto has no ML-KEM.

import { DeviceKeys, DeviceState, EdgeClient, RelayPublic } from "relayd-device";
import * as store from "./store.js";

const TYPING_IDLE_MS = 3000;
const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const ui = {
  status: $("status"), business: /** @type {HTMLSelectElement} */ ($("business")), remove: /** @type {HTMLButtonElement} */ ($("delete")),
  messages: $("messages"), typing: $("typing"), notice: $("notice"), composer: /** @type {HTMLFormElement} */ ($("composer")),
  text: /** @type {HTMLInputElement} */ ($("text")), send: /** @type {HTMLButtonElement} */ ($("send")), registration: $("registration"),
};

/**
 * @typedef {{id: string, from: "me" | "business", text: string, state?: "sending" | "sent" | "read" | "failed"}} Line
 * @typedef {{open: boolean, messages: Line[], unread: number}} Conversation
 */
/** @type {Map<string, Conversation>} */
const conversations = new Map();
/** @type {Map<string, string>} */
const names = new Map();
let typing = false;
/** @type {ReturnType<typeof setTimeout> | undefined} */
let typingTimer;

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
for (const id of names.keys()) conversations.set(id, (await store.get("conversations", id)) ?? { open: false, messages: [], unread: 0 });

const client = new EdgeClient({ url: config.edge_url, edgeName: config.edge_name, keys, relay, state, onMessage });
client.addEventListener("status", (event) => {
  const { status, reason } = /** @type {CustomEvent} */ (event).detail;
  ui.status.dataset.state = status;
  ui.status.textContent = { idle: "starting…", connecting: "connecting…", ready: "online", waiting: "offline, retrying…", stopped: `stopped (${reason})` }[/** @type {string} */ (status)] ?? status;
});
client.addEventListener("problem", (event) => console.warn("relayd:", /** @type {CustomEvent} */ (event).detail));
client.start();

ui.business.addEventListener("change", () => { stopTyping(false); render(); markRead(); });
ui.text.addEventListener("input", onInput);
ui.composer.addEventListener("submit", (event) => { event.preventDefault(); sendText(); });
ui.remove.addEventListener("click", deleteConversation);
document.addEventListener("visibilitychange", markRead);
render();

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

function current() {
  return ui.business.value;
}

/** @param {string} business */
function conversation(business) {
  if (!conversations.has(business)) conversations.set(business, { open: false, messages: [], unread: 0 });
  return /** @type {Conversation} */ (conversations.get(business));
}

/** @param {string} business */
function save(business) {
  return store.put("conversations", business, conversation(business));
}

function render() {
  const talk = conversation(current());
  ui.messages.replaceChildren(...talk.messages.map((line) => {
    const item = document.createElement("li");
    item.textContent = line.text;
    item.dataset.test = "message";
    item.dataset.id = line.id;
    item.dataset.from = line.from;
    if (line.state) item.dataset.state = line.state;
    return item;
  }));
  ui.send.textContent = talk.open ? "Send" : "Start conversation";
  ui.remove.disabled = !talk.open && talk.messages.length === 0;
}

/** @param {string} text */
function notice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = !text;
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
    }
    return;
  }
  if (message.type === "message") {
    talk.messages.push({ id: message.id, from: "business", text: describe(body) });
    talk.unread += 1;
    if (business === current()) ui.typing.hidden = true;
  } else if (message.type === "read") {
    // "sending" too: the business may read a message before its ack reaches this page.
    for (const line of talk.messages) if (line.from === "me" && (line.state === "sent" || line.state === "sending")) line.state = "read";
  } else if (message.type === "close") {
    talk.open = false;
    if (business === current()) notice("The conversation was closed.");
  } else if (message.type === "echo") {
    talk.open = true; // written from another of the user's devices
    talk.messages.push({ id: message.id, from: "me", text: describe(body.body ?? {}), state: "sent" });
  }
  await save(business);
  if (business === current()) render();
  markRead();
}

/** @param {Record<string, any>} body */
function describe(body) {
  const files = Array.isArray(body.attachments) ? ` [${body.attachments.length} attachment(s)]` : "";
  return `${typeof body.text === "string" ? body.text : ""}${files}`;
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

async function sendText() {
  const text = ui.text.value.trim();
  if (!text) return;
  const business = current();
  const talk = conversation(business);
  stopTyping(talk.open);
  const line = /** @type {Line} */ ({ id: crypto.randomUUID(), from: "me", text, state: "sending" });
  const type = talk.open ? "message" : "start";
  talk.open = true;
  talk.messages.push(line);
  ui.text.value = "";
  notice("");
  await save(business);
  render();
  try {
    await client.send(business, type, { text }, { id: line.id });
    if (line.state === "sending") line.state = "sent";
  } catch (error) {
    line.state = "failed";
    notice(`Not sent: ${error instanceof Error ? error.message : error}`);
  }
  await save(business);
  if (business === current()) render();
}

async function deleteConversation() {
  const business = current();
  stopTyping(false);
  try {
    if (conversation(business).open) await client.send(business, "close");
  } catch (error) {
    return notice(`Not deleted: ${error instanceof Error ? error.message : error}`);
  }
  conversations.set(business, { open: false, messages: [], unread: 0 });
  await save(business);
  notice("");
  ui.typing.hidden = true;
  render();
}
