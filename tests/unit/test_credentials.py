"""Keys from systemd credentials: LoadCredential=keys:DIR gives keys_<file> files."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from relayd import keys
from relayd.config import Keys
from relayd.errors import KeyFileError


def as_credentials(keys_dir: Path, credentials: Path) -> None:
    """Copy key files the way systemd loads a directory credential named `keys`."""
    credentials.mkdir()
    for path in keys_dir.iterdir():
        shutil.copy(path, credentials / f"keys_{path.name}")
        (credentials / f"keys_{path.name}").chmod(0o400)


class TestLocation:
    def test_credentials_win_when_they_hold_the_keys(self, tmp_path: Path) -> None:
        """With the keys among the credentials, they are read there and keys.dir is unused."""
        keys.generate(tmp_path / "source", "cred-1")
        as_credentials(tmp_path / "source", tmp_path / "creds")
        environ = {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}
        assert keys.location(tmp_path / "nowhere", environ) == (tmp_path / "creds", "keys_")
        ring = keys.from_settings(Keys(dir=tmp_path / "nowhere"), environ)
        assert ring.current.kid == "cred-1"
        assert ring.opaque_secret == keys.load(tmp_path / "source",
                                               timedelta(days=1)).opaque_secret

    def test_keys_dir_without_key_credentials(self, tmp_path: Path) -> None:
        """Credentials that hold other things (a TLS key, say) leave keys.dir in charge."""
        (tmp_path / "creds").mkdir()
        (tmp_path / "creds" / "tls.pem").write_text("x")
        keys.generate(tmp_path / "keys", "dir-1")
        environ = {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}
        assert keys.location(tmp_path / "keys", environ) == (tmp_path / "keys", "")
        assert keys.from_settings(Keys(dir=tmp_path / "keys"), environ).current.kid == "dir-1"
        assert keys.location(tmp_path / "keys", {}) == (tmp_path / "keys", "")

    def test_credentials_are_checked_like_files(self, tmp_path: Path) -> None:
        """A credential readable by others is refused as a key file would be."""
        keys.generate(tmp_path / "source", "cred-1")
        as_credentials(tmp_path / "source", tmp_path / "creds")
        (tmp_path / "creds" / "keys_opaque.json").chmod(0o644)
        with pytest.raises(KeyFileError, match="readable by others"):
            keys.from_settings(Keys(dir=tmp_path / "nowhere"),
                               {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")})
