"""The relay's own keys on disk: HPKE key pairs by kid, one Ed25519 signing key and the
secret behind opaque conversation ids.

Each key is one JSON file in `keys.dir`, mode 0600, never overwritten:
`hpke-<kid>.json`, `signing.json`, `opaque.json`. The newest HPKE key is the current one
(it is what devices seal to); older ones keep opening messages for `grace_period_days`
after their successor was made.

Under systemd, `LoadCredential=keys:/etc/relayd/keys` hands the same files to the
service as credentials named `keys_<file>` in $CREDENTIALS_DIRECTORY. When that
directory holds `keys_signing.json`, every key is read from there and `keys.dir` is
not used (see location()).
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import secrets
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric import ed25519

from relayd.config import Keys
from relayd.crypto import Kem, PrivateKey, b64d, b64e, ed25519_public, raw_public, signing_public
from relayd.errors import KeyFileError

KID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # always fullmatch()
SIGNING_FILE = "signing.json"
OPAQUE_FILE = "opaque.json"
CREDENTIAL_PREFIX = "keys_"


@dataclass(frozen=True, slots=True)
class RelayKey:
    kid: str
    kem: Kem
    created: datetime
    private: PrivateKey
    public_raw: bytes


@dataclass(frozen=True, slots=True)
class KeyRing:
    """Every key the relay holds, loaded and checked."""

    hpke: dict[str, RelayKey]  # the kids that may open messages now
    current: RelayKey
    signing: ed25519.Ed25519PrivateKey
    opaque_secret: bytes

    def public_info(self) -> dict[str, str]:
        """What a device needs to seal to the relay and to verify it."""
        return {
            "kid": self.current.kid,
            "kem": self.current.kem.value,
            "enc_public_key": b64e(self.current.public_raw),
            "sign_public_key": b64e(self.signing.public_key().public_bytes_raw()),
        }


KeySource = Callable[[], KeyRing]  # the keys current now: read at each use, so reloads apply


def _write_new(path: Path, content: dict[str, Any]) -> bool:
    """Create `path` with mode 0600; False, and nothing written, if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as out:
        out.write(orjson.dumps(content, option=orjson.OPT_INDENT_2))
    return True


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def generate(keys_dir: Path, kid: str | None = None, kem: Kem = Kem.X25519) -> list[str]:
    """Create whatever keys are missing; return the files written.

    A new kid adds an HPKE key (a rotation); an existing file is never touched.
    """
    kid = datetime.now(UTC).strftime("r%Y-%m-%d") if kid is None else kid
    if not KID_PATTERN.fullmatch(kid):
        raise KeyFileError(kid, "a kid is 1-64 letters, digits, '.', '_' or '-'")
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    written = []
    _, raw = kem.generate()
    hpke_file = keys_dir / f"hpke-{kid}.json"
    if _write_new(hpke_file, {"kid": kid, "kem": kem.value, "created": _now(),
                              "private_key": b64e(raw)}):
        written.append(hpke_file.name)
    signing = ed25519.Ed25519PrivateKey.generate().private_bytes_raw()
    if _write_new(keys_dir / SIGNING_FILE, {"created": _now(), "private_key": b64e(signing)}):
        written.append(SIGNING_FILE)
    if _write_new(keys_dir / OPAQUE_FILE, {"created": _now(),
                                           "secret": b64e(secrets.token_bytes(32))}):
        written.append(OPAQUE_FILE)
    return written


def _read(path: Path) -> dict[str, Any]:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(str(path), "missing: run `relayd keys generate`") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(str(path), f"is readable by others (mode {mode & 0o777:o}): chmod 600")
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise KeyFileError(str(path), f"unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise KeyFileError(str(path), "is not a JSON object")
    return data


def _hpke_key(path: Path) -> RelayKey:
    data = _read(path)
    try:
        kem = Kem(data["kem"])
        raw = b64d(data["private_key"])
        public_raw = raw_public(kem, raw)
        kem.public_key(public_raw)  # the check every public key passes (relayd.crypto)
        return RelayKey(
            kid=str(data["kid"]),
            kem=kem,
            created=datetime.fromisoformat(data["created"]),
            private=kem.private_key(raw),
            public_raw=public_raw,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise KeyFileError(str(path), f"malformed HPKE key: {exc}") from None


def _readable(keys_dir: Path) -> None:
    """Refuse a directory that is missing, or that this user may not read (which a
    glob would take for an empty one)."""
    try:
        next(keys_dir.iterdir(), None)
    except FileNotFoundError:
        raise KeyFileError(str(keys_dir), "no such directory: run `relayd keys generate`"
                           ) from None
    except PermissionError:
        raise KeyFileError(str(keys_dir), f"not readable by user {_user()}: run this as root, "
                           "or as the user that owns the keys (the service gets them as "
                           "systemd credentials, LoadCredential=)") from None
    except NotADirectoryError:
        raise KeyFileError(str(keys_dir), "is not a directory") from None


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def location(keys_dir: Path, environ: Mapping[str, str] | None = None) -> tuple[Path, str]:
    """Where the key files are, and the prefix of their names: systemd's credentials
    directory when it holds the keys, else `keys_dir`."""
    credentials = (os.environ if environ is None else environ).get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / (CREDENTIAL_PREFIX + SIGNING_FILE)).is_file():
        return Path(credentials), CREDENTIAL_PREFIX
    return keys_dir, ""


def from_settings(section: Keys, environ: Mapping[str, str] | None = None) -> KeyRing:
    """The keys the config names, from wherever location() finds them."""
    keys_dir, prefix = location(section.dir, environ)
    return load(keys_dir, timedelta(days=section.grace_period_days), prefix=prefix)


def load(keys_dir: Path, grace_period: timedelta, now: datetime | None = None,
         prefix: str = "") -> KeyRing:
    """Load and check every key; refuse files that others can read."""
    now = now or datetime.now(UTC)
    _readable(keys_dir)
    keys = sorted((_hpke_key(p) for p in keys_dir.glob(f"{prefix}hpke-*.json")),
                  key=lambda k: k.created)
    if not keys:
        raise KeyFileError(str(keys_dir), "holds no HPKE key: run `relayd keys generate`")
    usable = {keys[-1].kid: keys[-1]}
    for older, newer in itertools.pairwise(keys):
        if now - newer.created <= grace_period:
            usable[older.kid] = older
    try:
        signing = ed25519.Ed25519PrivateKey.from_private_bytes(
            b64d(_read(keys_dir / (prefix + SIGNING_FILE))["private_key"])
        )
        ed25519_public(signing_public(signing))  # the check every public key passes
        opaque = b64d(_read(keys_dir / (prefix + OPAQUE_FILE))["secret"])
    except (KeyError, ValueError, TypeError) as exc:
        raise KeyFileError(str(keys_dir), f"malformed signing or opaque key: {exc}") from None
    if len(opaque) < 32:
        raise KeyFileError(str(keys_dir / (prefix + OPAQUE_FILE)),
                           "the secret must be 32 bytes or more")
    return KeyRing(hpke=usable, current=keys[-1], signing=signing, opaque_secret=opaque)
