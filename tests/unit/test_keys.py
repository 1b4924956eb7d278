"""The relay's key files (relayd.keys): generation, rotation, grace period and checks."""

from __future__ import annotations

import stat
from datetime import timedelta
from pathlib import Path

import orjson
import pytest

from relayd import keys
from relayd.crypto import Kem, b64d, b64e
from relayd.errors import ConfigError, KeyFileError

GRACE = timedelta(days=30)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class TestGenerate:
    def test_writes_three_files_with_mode_0600(self, tmp_path: Path) -> None:
        """The first run writes the HPKE, signing and opaque files, each mode 0600."""
        written = keys.generate(tmp_path / "keys", "a")
        assert written == ["hpke-a.json", "signing.json", "opaque.json"]
        for name in written:
            assert _mode(tmp_path / "keys" / name) == 0o600

    def test_never_overwrites(self, tmp_path: Path) -> None:
        """A second run with the same kid writes nothing and leaves every file unchanged."""
        keys.generate(tmp_path, "a")
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        assert keys.generate(tmp_path, "a") == []
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    def test_new_kid_adds_key_and_becomes_current(self, tmp_path: Path) -> None:
        """A new kid adds only its HPKE file, keeps the others, and becomes current."""
        keys.generate(tmp_path, "a")
        signing = (tmp_path / "signing.json").read_bytes()
        assert keys.generate(tmp_path, "b") == ["hpke-b.json"]
        assert (tmp_path / "signing.json").read_bytes() == signing
        ring = keys.load(tmp_path, GRACE)
        assert ring.current.kid == "b"
        assert set(ring.hpke) == {"a", "b"}

    def test_default_kid_is_dated(self, tmp_path: Path) -> None:
        """Without a kid, the HPKE key is named r<YYYY-MM-DD>."""
        (name, *_) = keys.generate(tmp_path)
        assert keys.KID_PATTERN.match(name.removeprefix("hpke-").removesuffix(".json"))
        assert name.startswith("hpke-r20")

    @pytest.mark.parametrize("kid", ["-", "../escape", "a/b", ".hidden", "x" * 65, "a b"])
    def test_bad_kid_refused(self, tmp_path: Path, kid: str) -> None:
        """A kid that is not 1-64 safe characters is refused and nothing is written."""
        with pytest.raises(KeyFileError):
            keys.generate(tmp_path / "keys", kid)
        assert not (tmp_path / "keys").exists()

    def test_kid_with_trailing_newline_refused(self, tmp_path: Path) -> None:
        """A kid of 'a\\n' is refused."""
        with pytest.raises(KeyFileError):
            keys.generate(tmp_path, "a\n")


class TestLoad:
    def test_old_kid_usable_within_grace_period(self, tmp_path: Path) -> None:
        """The previous kid still opens messages until grace_period after its successor."""
        keys.generate(tmp_path, "a")
        keys.generate(tmp_path, "b")
        successor = keys.load(tmp_path, GRACE).current.created
        ring = keys.load(tmp_path, GRACE, now=successor + GRACE - timedelta(seconds=1))
        assert set(ring.hpke) == {"a", "b"}
        assert ring.current.kid == "b"

    def test_old_kid_dropped_after_grace_period(self, tmp_path: Path) -> None:
        """Past the grace period only the current kid remains usable."""
        keys.generate(tmp_path, "a")
        keys.generate(tmp_path, "b")
        successor = keys.load(tmp_path, GRACE).current.created
        ring = keys.load(tmp_path, GRACE, now=successor + GRACE + timedelta(seconds=1))
        assert set(ring.hpke) == {"b"}

    def test_each_kid_graced_by_its_own_successor(self, tmp_path: Path) -> None:
        """With three kids, the oldest drops once its successor is older than the grace."""
        for kid in ("a", "b", "c"):
            keys.generate(tmp_path, kid)
        created = {k.kid: k.created for k in keys.load(tmp_path, GRACE).hpke.values()}
        ring = keys.load(tmp_path, timedelta(0), now=created["c"])
        assert set(ring.hpke) == {"b", "c"}

    def test_refuses_key_file_readable_by_others(self, tmp_path: Path) -> None:
        """A key file with mode 0644 is refused with a message saying why."""
        keys.generate(tmp_path, "a")
        (tmp_path / "hpke-a.json").chmod(0o644)
        with pytest.raises(KeyFileError, match="readable by others") as caught:
            keys.load(tmp_path, GRACE)
        assert isinstance(caught.value, ConfigError)

    @pytest.mark.parametrize("name", ["signing.json", "opaque.json"])
    def test_refuses_other_files_readable_by_others(self, tmp_path: Path, name: str) -> None:
        """The signing and opaque files are checked for their mode too."""
        keys.generate(tmp_path, "a")
        (tmp_path / name).chmod(0o640)
        with pytest.raises(KeyFileError, match="readable by others"):
            keys.load(tmp_path, GRACE)

    def test_refuses_missing_dir(self, tmp_path: Path) -> None:
        """A keys.dir that does not exist is refused."""
        with pytest.raises(KeyFileError, match="no such directory"):
            keys.load(tmp_path / "absent", GRACE)

    def test_refuses_dir_without_hpke_key(self, tmp_path: Path) -> None:
        """A keys.dir holding no HPKE key is refused."""
        with pytest.raises(KeyFileError, match="no HPKE key"):
            keys.load(tmp_path, GRACE)

    def test_refuses_malformed_hpke_file(self, tmp_path: Path) -> None:
        """An HPKE key file that is not a JSON object is refused."""
        keys.generate(tmp_path, "a")
        path = tmp_path / "hpke-a.json"
        path.write_bytes(b"[1]")
        with pytest.raises(KeyFileError, match="not a JSON object"):
            keys.load(tmp_path, GRACE)

    def test_refuses_short_opaque_secret(self, tmp_path: Path) -> None:
        """An opaque secret under 32 bytes is refused."""
        keys.generate(tmp_path, "a")
        path = tmp_path / "opaque.json"
        path.write_bytes(orjson.dumps({"secret": b64e(bytes(31))}))
        with pytest.raises(KeyFileError, match="32 bytes"):
            keys.load(tmp_path, GRACE)

    def test_loaded_keys_match_files(self, tmp_path: Path) -> None:
        """The ring's opaque secret and HPKE key are the ones on disk."""
        keys.generate(tmp_path, "a")
        ring = keys.load(tmp_path, GRACE)
        secret = b64d(orjson.loads((tmp_path / "opaque.json").read_bytes())["secret"])
        assert ring.opaque_secret == secret
        assert ring.current.kem is Kem.X25519


class TestPublicInfo:
    @pytest.mark.parametrize(("kem", "enc_size"), [(Kem.X25519, 32),
                                                   (Kem.MLKEM768_X25519, 1216)])
    def test_shape(self, tmp_path: Path, kem: Kem, enc_size: int) -> None:
        """public_info has exactly kid, kem, enc_public_key, sign_public_key in base64url."""
        keys.generate(tmp_path, "k1", kem)
        info = keys.load(tmp_path, GRACE).public_info()
        assert set(info) == {"kid", "kem", "enc_public_key", "sign_public_key"}
        assert (info["kid"], info["kem"]) == ("k1", kem.value)
        for field in ("enc_public_key", "sign_public_key"):
            assert "=" not in info[field]
            assert set(info[field]) <= set(
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        assert len(b64d(info["enc_public_key"])) == enc_size
        assert len(b64d(info["sign_public_key"])) == 32

    def test_public_key_belongs_to_private_key(self, tmp_path: Path) -> None:
        """The published encryption key is the public half of the current private key."""
        keys.generate(tmp_path, "k1", Kem.X25519)
        ring = keys.load(tmp_path, GRACE)
        private = ring.current.private
        assert b64d(ring.public_info()["enc_public_key"]) == (
            private.public_key().public_bytes_raw())
