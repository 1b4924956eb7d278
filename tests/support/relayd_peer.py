"""relayd's side of the JavaScript SDK's interop tests, run as a subprocess by clients/js/test.

Reads a JSON list of requests on stdin and writes a JSON list of answers on stdout. Every
operation goes through relayd's own code (envelope, payload, crypto), so the JavaScript
tests prove the SDK against relayd itself, not against a second reading of the contract.

Requests:
- {"op": "relay", "kem": K, "kid": KID}: new relay keys; answers the `relayd keys show`
  JSON as "public", the raw HPKE private key as "private", the Ed25519 seed as "signing".
- {"op": "open_up", "relay": <an answer of "relay">, "sign_key": B64, "sealed": B64}:
  open, verify and validate an up message as the inbound worker does (steps 3 to 11 of
  "Opening, in order"); answers {"up": {...}} or {"error": <dead-letter reason>}.
- {"op": "seal_down", "relay": <...>, "device": ID, "kem": K, "enc_key": B64, "seq": N,
  "id": UUID, "from": BIZ, "type": T, "body": {...}}: a down message sealed by relayd to
  that device key; answers {"sealed": B64}.
- {"op": "check_key", "kind": "X25519" | "MLKEM768_X25519" | "Ed25519", "raw": B64}: whether
  relayd.crypto takes the public key; answers {"ok": bool}.
- {"op": "problem", "type": T, "body": ..., "sender": "user" | "business"}: why relayd
  refuses that body (relayd.bodies.problem with the default limits); answers
  {"problem": text or null}.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric import ed25519

from relayd import bodies, envelope, payload
from relayd.config import Limits
from relayd.crypto import Kem, b64d, b64e, ed25519_public, raw_public, signing_public
from relayd.errors import EnvelopeError


def relay(request: dict[str, Any]) -> dict[str, Any]:
    kem = Kem(request["kem"])
    _, private = kem.generate()
    signing = ed25519.Ed25519PrivateKey.generate()
    public = {"kid": request["kid"], "kem": kem.value,
              "enc_public_key": b64e(raw_public(kem, private)),
              "sign_public_key": b64e(signing_public(signing))}
    return {"public": public, "private": b64e(private),
            "signing": b64e(signing.private_bytes_raw())}


def open_up(request: dict[str, Any]) -> dict[str, Any]:
    keys = request["relay"]
    kem = Kem(keys["public"]["kem"])
    try:
        signature, plain = envelope.open_sealed(
            b64d(request["sealed"]), direction="up", kid=keys["public"]["kid"], kem=kem,
            private=kem.private_key(b64d(keys["private"])))
        claims, _ = payload.peek_device(plain)
        envelope.verify(signature, plain, direction="up",
                        signer=ed25519.Ed25519PublicKey.from_public_bytes(
                            b64d(request["sign_key"])))
        up = payload.validate_up(claims, Limits())
        payload.check_fresh(up.ts, time.time_ns() // 1_000_000, Limits())
    except EnvelopeError as error:
        return {"error": error.reason}
    return {"up": claims, "payload": plain.decode()}


def seal_down(request: dict[str, Any]) -> dict[str, Any]:
    keys = request["relay"]
    kem = Kem(request["kem"])
    plain = payload.down_payload(request["device"], request["seq"],
                                 time.time_ns() // 1_000_000, request["id"], request["from"],
                                 request["type"], request["body"])
    sealed = envelope.seal(
        plain, direction="down", kid=request["device"], kem=kem,
        recipient=kem.public_key(b64d(request["enc_key"])),
        signer=ed25519.Ed25519PrivateKey.from_private_bytes(b64d(keys["signing"])))
    return {"sealed": b64e(sealed), "payload": plain.decode()}


def check_key(request: dict[str, Any]) -> dict[str, Any]:
    raw = b64d(request["raw"])
    try:
        if request["kind"] == "Ed25519":
            ed25519_public(raw)
        else:
            Kem(request["kind"]).public_key(raw)
    except ValueError:
        return {"ok": False}
    return {"ok": True}


def problem(request: dict[str, Any]) -> dict[str, Any]:
    return {"problem": bodies.problem(request["type"], request["body"], Limits(),
                                      request["sender"])}


OPERATIONS = {"relay": relay, "open_up": open_up, "seal_down": seal_down,
              "check_key": check_key, "problem": problem}


def main() -> None:
    requests = orjson.loads(sys.stdin.buffer.read())
    sys.stdout.buffer.write(orjson.dumps([OPERATIONS[r["op"]](r) for r in requests]))


if __name__ == "__main__":
    main()
