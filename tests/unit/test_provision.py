"""What a business's RabbitMQ user may do, as data (relayd.provision.grant)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relayd import config, opaque, provision
from relayd.errors import ConfigError

SECRET = bytes(range(32))
ACME = opaque.inbox_token(SECRET, "acme")
REQUIRED = {"store": {"url": "sqlite:////var/lib/relayd/relayd.db"},
            "keys": {"dir": "/var/lib/relayd/keys"}}


def settings(url: str = "amqps://relayd@broker:5671/relayd", **management: object
             ) -> config.Settings:
    return config.parse({**REQUIRED, "amqp": {"url": url, "management": {
        "url": "https://broker:15671", "username": "admin", "password": "s3cr3t-admin",
        **management}}}, environ={})


class TestVhost:
    @pytest.mark.parametrize(("url", "vhost"), [
        ("amqps://u:p@broker:5671/relayd", "relayd"),
        ("amqp://broker/", "/"),
        ("amqp://broker", "/"),
        ("amqps://broker:5671/%2F", "/"),
        ("amqps://broker:5671/team%2Fchat?auth=external", "team/chat"),
    ])
    def test_vhost_of_url(self, url: str, vhost: str) -> None:
        """The vhost is the URL's unquoted path, or "/" when it has none."""
        assert provision.vhost_of(url) == vhost

    def test_configured_vhost_wins(self) -> None:
        """amqp.management.vhost overrides the vhost derived from amqp.url."""
        grant = provision.grant(settings(vhost="other"), "acme", "acme-user", "password", SECRET)
        assert grant.vhost == "other"


class TestGrant:
    def test_permissions_are_exact_names(self) -> None:
        """Configure nothing, write the replies exchange, read the business's own inbox."""
        grant = provision.grant(settings(), "acme", "acme-user", "password", SECRET)
        assert grant.vhost == "relayd"
        assert grant.permissions == {"configure": "^$", "write": r"^relayd\.replies$",
                                     "read": rf"^relayd\.biz\.{ACME}\.inbox$"}
        assert grant.topic == {"exchange": "relayd.replies", "write": "^acme$", "read": "^$"}
        assert grant.limits == {"max-connections": 10, "max-channels": 20}
        assert grant.tags == ["relayd-business"]

    @pytest.mark.parametrize("other", [
        f"relayd.biz.{ACME}2.inbox", f"relayd.biz.{ACME}.inbox2", f"relayd.biz.{ACME}Xinbox",
        f"relayd.bizX{ACME}.inbox", f"xrelayd.biz.{ACME}.inbox", "relayd.biz.acme.inbox",
        f"relayd.biz.{opaque.inbox_token(SECRET, 'other')}.inbox",
        f"relayd.biz.{opaque.inbox_token(bytes(32), 'acme')}.inbox",
    ])
    def test_read_matches_no_other_queue(self, other: str) -> None:
        """The read pattern is anchored and escaped: no look-alike queue matches it, nor
        the inbox's old name (by id), another business's, or one under another secret."""
        read = provision.grant(settings(), "acme", "acme-user", "password",
                               SECRET).permissions["read"]
        assert re.search(read, f"relayd.biz.{ACME}.inbox")
        assert not re.search(read, other)

    @pytest.mark.parametrize("key", ["acme2", "acm", "other", "acme.x", ""])
    def test_topic_write_matches_only_own_id(self, key: str) -> None:
        """The routing-key pattern matches the business's id and nothing else."""
        write = provision.grant(settings(), "acme", "acme-user", "password", SECRET).topic["write"]
        assert re.search(write, "acme")
        assert not re.search(write, key)

    def test_configured_names_and_limits(self) -> None:
        """Custom topology names and user limits flow into the grant."""
        s = settings(max_connections=2, max_channels=3).model_copy(update={
            "topology": config.Topology(replies_exchange="x.replies",
                                        business_inbox="biz-{business}-in")})
        grant = provision.grant(s, "a-1", "u", "x509", SECRET)
        assert grant.permissions["write"] == r"^x\.replies$"
        assert grant.permissions["read"] == rf"^biz\-{opaque.inbox_token(SECRET, 'a-1')}\-in$"
        assert grant.limits == {"max-connections": 2, "max-channels": 3}
        assert grant.tags == ["relayd-business", "relayd-x509"]

    def test_needs_management(self) -> None:
        """Without amqp.management there is nothing to provision with."""
        s = config.parse({**REQUIRED, "amqp": {"url": "amqp://broker/"}}, environ={})
        with pytest.raises(ConfigError, match=r"amqp\.management"):
            provision.grant(s, "acme", "acme-user", "password", SECRET)


class TestSecretFile:
    def test_written_owner_only(self, tmp_path: Path) -> None:
        """A password file is created with mode 0600."""
        path = tmp_path / "pw"
        provision.write_secret(path, "hunter2-but-longer")
        assert path.read_text() == "hunter2-but-longer\n"
        assert path.stat().st_mode & 0o777 == 0o600

    def test_existing_file_tightened(self, tmp_path: Path) -> None:
        """An existing world-readable file is replaced and made owner-only."""
        path = tmp_path / "pw"
        path.write_text("old")
        path.chmod(0o644)
        provision.write_secret(path, "new")
        assert path.read_text() == "new\n"
        assert path.stat().st_mode & 0o777 == 0o600


class TestConfig:
    def test_rates_must_be_positive(self) -> None:
        """A rate limit of zero would refuse everything: it is a config error."""
        with pytest.raises(ConfigError, match=r"limits\.device_rate"):
            config.parse({**REQUIRED, "amqp": {"url": "amqp://b/"},
                          "limits": {"device_rate": 0}}, environ={})

    def test_management_url_scheme(self) -> None:
        """amqp.management.url must be http(s)."""
        with pytest.raises(ConfigError, match=r"amqp\.management\.url"):
            config.parse({**REQUIRED, "amqp": {"url": "amqp://b/", "management": {
                "url": "ftp://b", "username": "a", "password": "s3cr3t-admin"}}}, environ={})
