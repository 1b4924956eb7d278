// A relayd device in JavaScript, for browsers and Node 20: keys, sealing, the edge.

export { b64uDecode, b64uEncode } from "./b64.js";
export { EdgeClient, MAX_ENVELOPE_BYTES, SUBPROTOCOL } from "./edge.js";
export { info, openSealed, seal, signedBytes, verify, SIGNATURE_BYTES } from "./envelope.js";
export { EnvelopeError, SendError } from "./errors.js";
export { DeviceKeys, RelayPublic } from "./keys.js";
export { loginBytes, loginFrame } from "./login.js";
export { parseDown, upPayload, DOWN_TYPES, UP_TYPES } from "./payload.js";
export { INTERACTIVE, LIMITS, bodyProblem, checkBody, interactive, isEmoji, isMessageId, message, parseBody, reaction, response } from "./rich.js";
export { DeviceState } from "./state.js";
export { KEMS } from "./suite.js";
export { WeakKeyError, checkEd25519, checkMlkem768X25519, checkX25519 } from "./weak.js";
