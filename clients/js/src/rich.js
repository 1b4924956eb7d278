// The body of each message type (docs/protocol.md sections 3 and 13), checked with the
// rules relayd applies (relayd/bodies.py) and its default limits; builders for the bodies a
// device sends and a business sends, and a parser for what arrives.
//
// A device answers an interactive message with `response(messageId, ["tea"])` and reacts
// with `reaction(messageId, "👍")`; a page reads a business's message with
// `parseBody("message", body, "business")`, which says which picker it carries.

/** @typedef {"user" | "business"} Sender */

/** relayd's default limits (config `limits.*`). */
export const LIMITS = Object.freeze({
  maxTextChars: 10_000, maxInlineAttachmentBytes: 262_144, maxAttachments: 10,
  maxQuickReplies: 5, maxListItems: 100, maxTimeSlots: 50, maxThumbnailBytes: 16_384,
});
export const INTERACTIVE = Object.freeze(["quick_reply", "list_picker", "time_picker", "rich_link"]);
const SHORT = 256;
const LONG = 2048;
const OPTION_TITLE = 64;
const MAX_SECTIONS = 10;
const MAX_SLOT_SECONDS = 86_400;
const MAX_START_MS = 2 ** 53 - 1;
const EMOJI_CODE_POINTS = 16;
const ID = /^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$/;
const TIMEZONE = /^[A-Za-z][A-Za-z0-9_+-]{0,31}(?:\/[A-Za-z0-9_+-]{1,32}){0,2}$/;
const HTTPS_URL = /^https:\/\/[A-Za-z0-9._~:/?#[\]@!$&'()*+,;=%-]{1,2040}$/;
const MESSAGE_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;
const REFERENCE_KEYS = ["key", "mime", "sha256", "size", "url"];
const KEYCAP = 0x20e3;
const SYMBOL = /^\p{So}$/u;
/** What may join the symbols of one emoji: ZWJ, VS15, VS16, the keycap, tags, keycap bases. */
const isJoiner = (/** @type {number} */ c) => c === 0x200d || c === 0xfe0e || c === 0xfe0f || c === KEYCAP
  || (c >= 0xe0020 && c < 0xe0080) || "0123456789#*".includes(String.fromCodePoint(c));

/** @param {unknown} value @returns {value is Record<string, any>} */
const isObject = (value) => typeof value === "object" && value !== null && !Array.isArray(value);
/** Length in code points, as relayd counts characters. @param {string} text */
const chars = (text) => [...text].length;
/** @param {unknown} value @param {number} [limit] */
const shortStr = (value, limit = SHORT) => typeof value === "string" && value.length > 0 && chars(value) <= limit;
/** @param {unknown} value */
const isInt = (value) => Number.isSafeInteger(value);
/** @param {unknown} value */
const isId = (value) => typeof value === "string" && ID.test(value);
/** @param {unknown} value */
export const isMessageId = (value) => typeof value === "string" && MESSAGE_ID.test(value);
/** @param {unknown} value @param {number} low @param {number} high @returns {value is any[]} */
const isList = (value, low, high) => Array.isArray(value) && value.length >= low && value.length <= high;

/**
 * An object with every key of `required` and no key outside `required` and `optional`.
 * @param {unknown} item @param {string[]} required @param {string[]} [optional]
 * @returns {item is Record<string, any>}
 */
function hasKeys(item, required, optional = []) {
  if (!isObject(item)) return false;
  const keys = Object.keys(item);
  return required.every((k) => keys.includes(k)) && keys.every((k) => required.includes(k) || optional.includes(k));
}

/** @param {number} c */
const isSymbol = (c) => (c >= 0x1f000 && c <= 0x1faff) || SYMBOL.test(String.fromCodePoint(c));

/**
 * One emoji as relayd bounds it: 1 to 16 code points, each a symbol or a joiner, at least
 * one a symbol or the keycap.
 * @param {unknown} value
 */
export function isEmoji(value) {
  if (typeof value !== "string") return false;
  const points = [...value].map((c) => /** @type {number} */ (c.codePointAt(0)));
  if (points.length === 0 || points.length > EMOJI_CODE_POINTS) return false;
  return points.every((c) => isSymbol(c) || isJoiner(c)) && points.some((c) => isSymbol(c) || c === KEYCAP);
}

/**
 * Why an attachment is refused, or null.
 * @param {unknown} item @param {number} inlineLimit
 */
function attachmentProblem(item, inlineLimit) {
  if (!isObject(item)) return "an attachment is an object";
  if (hasKeys(item, REFERENCE_KEYS)) {
    const ok = ["url", "key", "sha256", "mime"].every((k) => shortStr(item[k], LONG)) && isInt(item.size) && item.size >= 0;
    return ok ? null : "a reference needs url, key, sha256, mime strings and a size";
  }
  if (!hasKeys(item, ["data", "mime"], ["name"])) return "an attachment is a reference {url,key,sha256,size,mime} or inline {data,mime,name?}";
  if (!shortStr(item.mime) || ("name" in item && !shortStr(item.name))) return "mime and name are short strings";
  const { data } = item;
  if (typeof data !== "string" || data.length > Math.floor((inlineLimit * 4) / 3) + 4) return "inline data is standard base64 within its size limit";
  if (!BASE64.test(data) || data.length % 4 !== 0) return "inline data is not base64";
  const size = (data.length / 4) * 3 - (data.endsWith("==") ? 2 : data.endsWith("=") ? 1 : 0);
  return size <= inlineLimit ? null : "inline data is too large";
}

/** An image: a reference, or inline up to `inlineLimit` bytes when it is not null. */
function imageProblem(/** @type {unknown} */ item, /** @type {number | null} */ inlineLimit) {
  if (inlineLimit === null && !hasKeys(item, REFERENCE_KEYS)) return "an image is a reference {url,key,sha256,size,mime}";
  const problem = attachmentProblem(item, inlineLimit ?? 0);
  if (problem) return problem;
  return /** @type {Record<string, string>} */ (item).mime.startsWith("image/") ? null : "an image's mime is image/…";
}

/** @param {Record<string, any>[]} items @param {string} what */
function uniqueIds(items, what) {
  if (!items.every((item) => isId(item.id))) return `a ${what} id is 1 to 64 letters, digits and _ . : / - (a letter or digit first)`;
  return new Set(items.map((item) => item.id)).size === items.length ? null : `${what} ids are unique in their message`;
}

/** @type {Record<string, (value: unknown, limits: typeof LIMITS) => string | null>} */
const INTERACTIVE_PROBLEM = {
  quick_reply(value, limits) {
    if (!hasKeys(value, ["options"]) || !isList(value.options, 2, limits.maxQuickReplies)) return `quick_reply is {options: 2 to ${limits.maxQuickReplies} of {id, title}}`;
    if (!value.options.every((o) => hasKeys(o, ["id", "title"]) && shortStr(o.title, OPTION_TITLE))) return "a quick reply option is {id, title}, its title 1 to 64 characters";
    return uniqueIds(value.options, "option");
  },
  list_picker(value, limits) {
    if (!hasKeys(value, ["title", "sections"], ["multiple"])) return "list_picker is {title, sections, multiple?}";
    if (!shortStr(value.title) || typeof (value.multiple ?? false) !== "boolean") return "a list picker's title is a short string, and multiple is true or false";
    if (!isList(value.sections, 1, MAX_SECTIONS)) return `a list picker has 1 to ${MAX_SECTIONS} sections`;
    if (!value.sections.every((s) => hasKeys(s, ["items"], ["title"]) && (!("title" in s) || shortStr(s.title)) && isList(s.items, 1, limits.maxListItems))) {
      return "a section is {items, title?}: a short title and at least one item";
    }
    const items = value.sections.flatMap((s) => s.items);
    if (items.length > limits.maxListItems) return `a list picker has at most ${limits.maxListItems} items`;
    for (const item of items) {
      if (!hasKeys(item, ["id", "title"], ["subtitle", "image"]) || !["title", "subtitle"].every((k) => !(k in item) || shortStr(item[k]))) {
        return "an item is {id, title, subtitle?, image?}, title and subtitle short strings";
      }
      const problem = "image" in item ? imageProblem(item.image, null) : null;
      if (problem) return problem;
    }
    return uniqueIds(items, "item");
  },
  time_picker(value, limits) {
    if (!hasKeys(value, ["title", "timezone", "slots"]) || !shortStr(value.title)) return "time_picker is {title, timezone, slots}, its title a short string";
    if (typeof value.timezone !== "string" || !TIMEZONE.test(value.timezone)) return "timezone is an IANA time zone name such as Europe/Paris";
    if (!isList(value.slots, 1, limits.maxTimeSlots)) return `a time picker has 1 to ${limits.maxTimeSlots} slots`;
    const good = (/** @type {any} */ s) => hasKeys(s, ["id", "start", "duration"]) && isInt(s.start) && s.start >= 0 && s.start <= MAX_START_MS
      && isInt(s.duration) && s.duration > 0 && s.duration <= MAX_SLOT_SECONDS;
    if (!value.slots.every(good)) return "a slot is {id, start, duration}: start in unix milliseconds, duration 1 to 86400 seconds";
    return uniqueIds(value.slots, "slot");
  },
  rich_link(value, limits) {
    if (!hasKeys(value, ["url", "title"], ["image"]) || !shortStr(value.title)) return "rich_link is {url, title, image?}, its title a short string";
    if (typeof value.url !== "string" || !HTTPS_URL.test(value.url)) return "a link's url is https:// and up to 2048 characters that RFC 3986 allows";
    return "image" in value ? imageProblem(value.image, limits.maxThumbnailBytes) : null;
  },
};

/** @param {Record<string, any>} body @param {typeof LIMITS} limits @param {Sender} sender */
function messageProblem(body, limits, sender) {
  const interactive = sender === "business" ? INTERACTIVE : [];
  if (!hasKeys(body, [], ["text", "attachments", "reply_to", ...interactive])) return `a message body holds text, attachments, reply_to${interactive.length ? ` and one of ${INTERACTIVE.join(", ")}` : ""}`;
  if (!("text" in body) && !("attachments" in body)) return "a message body holds text and/or attachments";
  if ("reply_to" in body && !isMessageId(body.reply_to)) return "reply_to is a message id: a lower-case canonical UUID";
  const kinds = interactive.filter((k) => k in body);
  if (kinds.length > 1) return `a message carries at most one of ${INTERACTIVE.join(", ")}`;
  if (kinds.length === 1) {
    if (!("text" in body) || "attachments" in body) return "an interactive message carries text (what older apps show), no attachments";
    return INTERACTIVE_PROBLEM[kinds[0]](body[kinds[0]], limits);
  }
  if (!("attachments" in body)) return null;
  if (!isList(body.attachments, 1, limits.maxAttachments)) return `attachments is a list of 1 to ${limits.maxAttachments}`;
  for (const item of body.attachments) {
    const problem = attachmentProblem(item, limits.maxInlineAttachmentBytes);
    if (problem) return problem;
  }
  return null;
}

/**
 * Why relayd refuses `body` for a message of `type` from `sender`, or null when it takes it.
 * @param {string} type
 * @param {unknown} body
 * @param {Sender} sender
 * @param {typeof LIMITS} [limits]
 * @returns {string | null}
 */
export function bodyProblem(type, body, sender, limits = LIMITS) {
  if (!isObject(body)) return "body must be an object";
  if ("text" in body && (typeof body.text !== "string" || chars(body.text) > limits.maxTextChars)) return `text is a string of at most ${limits.maxTextChars} characters`;
  if (type === "start") {
    if (!hasKeys(body, [], ["intent", "group", "text"])) return "a start body holds only intent, group and text";
    return ["intent", "group"].some((k) => k in body && !shortStr(body[k])) ? "intent and group are short strings" : null;
  }
  if (type === "message") return messageProblem(body, limits, sender);
  if (type === "response") {
    const most = Math.max(limits.maxQuickReplies, limits.maxListItems, limits.maxTimeSlots);
    if (!hasKeys(body, ["message_id", "selected"]) || !isMessageId(body.message_id)) return "a response is {message_id, selected}, message_id a lower-case canonical UUID";
    if (!isList(body.selected, 1, most) || !body.selected.every(isId)) return `selected is 1 to ${most} option, item or slot ids`;
    return new Set(body.selected).size === body.selected.length ? null : "selected names each id once";
  }
  if (type === "reaction") {
    if (!hasKeys(body, ["message_id", "emoji"], ["remove"]) || !isMessageId(body.message_id)) return "a reaction is {message_id, emoji, remove?}, message_id a lower-case UUID";
    if (!isEmoji(body.emoji)) return "emoji is one emoji: at most 16 code points, no text";
    return (body.remove ?? true) === true ? null : "remove is true, or left out";
  }
  return Object.keys(body).length ? "this type carries an empty body" : null;
}

/**
 * `body`, or a TypeError saying why relayd would refuse it.
 * @template {Record<string, unknown>} T
 * @param {string} type @param {T} body @param {Sender} sender
 * @returns {T}
 */
export function checkBody(type, body, sender) {
  const problem = bodyProblem(type, body, sender);
  if (problem) throw new TypeError(problem);
  return body;
}

/**
 * @typedef {{kind: "quick_reply" | "list_picker" | "time_picker" | "rich_link", text: string, replyTo?: string, value: Record<string, any>}} InteractiveMessage
 * @typedef {{kind: "response", messageId: string, selected: string[]}} ResponseBody
 * @typedef {{kind: "reaction", messageId: string, emoji: string, remove: boolean}} ReactionBody
 */

/**
 * What a `message` (an interactive one), `response` or `reaction` body holds, or null for
 * any other body; TypeError for a body relayd would refuse from `sender`. A device reads a
 * business's message with "business", and an echo's inner body with "user".
 * @param {string} type @param {Record<string, any>} body @param {Sender} sender
 * @returns {InteractiveMessage | ResponseBody | ReactionBody | null}
 */
export function parseBody(type, body, sender) {
  checkBody(type, body, sender);
  if (type === "response") return { kind: "response", messageId: body.message_id, selected: [...body.selected] };
  if (type === "reaction") return { kind: "reaction", messageId: body.message_id, emoji: body.emoji, remove: body.remove === true };
  const kind = type === "message" ? INTERACTIVE.find((k) => k in body) : undefined;
  if (!kind) return null;
  return { kind: /** @type {InteractiveMessage["kind"]} */ (kind), text: body.text, ...(body.reply_to ? { replyTo: body.reply_to } : {}), value: body[kind] };
}

/**
 * A message body: text, and maybe reply_to (the id of the message it answers).
 * @param {string} text @param {{replyTo?: string}} [options]
 */
export function message(text, { replyTo } = {}) {
  return checkBody("message", { text, ...(replyTo ? { reply_to: replyTo } : {}) }, "user");
}

/**
 * The user's answer to an interactive message: the option, item or slot ids chosen.
 * @param {string} messageId @param {string[]} selected
 */
export function response(messageId, selected) {
  return checkBody("response", { message_id: messageId, selected: [...selected] }, "user");
}

/**
 * An emoji on a message, or with `remove` its removal.
 * @param {string} messageId @param {string} emoji @param {{remove?: boolean}} [options]
 */
export function reaction(messageId, emoji, { remove = false } = {}) {
  return checkBody("reaction", { message_id: messageId, emoji, ...(remove ? { remove: true } : {}) }, "user");
}

/**
 * A business's interactive message (for a business written in JavaScript, and for tests).
 * @param {InteractiveMessage["kind"]} kind @param {string} text @param {Record<string, unknown>} value
 * @param {{replyTo?: string}} [options]
 */
export function interactive(kind, text, value, { replyTo } = {}) {
  return checkBody("message", { text, [kind]: value, ...(replyTo ? { reply_to: replyTo } : {}) }, "business");
}
