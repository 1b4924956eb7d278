"""A business's RabbitMQ user, provisioned through the broker's HTTP management API.

What a business may do is plain data (`grant`, no I/O); `ensure` applies it and reads
before it writes, so re-running it on a provisioned user changes nothing. relayd tags the
users it creates with `relayd-business` (and `relayd-x509` when certificate-only) and never
changes or deletes a user without that tag.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

import orjson

from relayd import topology
from relayd.config import Management, Settings
from relayd.errors import ConfigError, RelaydError

Auth = Literal["password", "x509"]
OWNED_TAG = "relayd-business"
X509_TAG = "relayd-x509"


class ProvisionError(RelaydError):
    """The broker refused a provisioning step, or the user is not relayd's to change."""


@dataclass(frozen=True, slots=True)
class Grant:
    """Everything one business's user may do in the relay's vhost."""

    user: str
    auth: Auth
    vhost: str
    permissions: dict[str, str]  # configure, write, read: regexes over resource names
    topic: dict[str, str]  # exchange, write, read: regexes over routing keys
    limits: dict[str, int]

    @property
    def tags(self) -> list[str]:
        return [OWNED_TAG, X509_TAG] if self.auth == "x509" else [OWNED_TAG]


def vhost_of(amqp_url: str) -> str:
    """The vhost an AMQP URL names: its path without the leading slash, or "/"."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def _exactly(name: str) -> str:
    return f"^{re.escape(name)}$"


def grant(settings: Settings, business_id: str, amqp_user: str, auth: Auth,
          secret: bytes) -> Grant:
    """Read only its inbox (named with `secret`, the relay's opaque secret), write only the
    replies exchange with its own id as routing key, configure nothing, and at most
    `max_connections` and `max_channels`."""
    t, m = settings.topology, settings.amqp.management
    if m is None:
        raise ConfigError({"amqp.management": "is required to provision a business"})
    return Grant(
        user=amqp_user,
        auth=auth,
        vhost=m.vhost or vhost_of(settings.amqp.url),
        permissions={"configure": "^$", "write": _exactly(t.replies_exchange),
                     "read": _exactly(topology.business_inbox(t, business_id, secret))},
        topic={"exchange": t.replies_exchange, "write": _exactly(business_id), "read": "^$"},
        limits={"max-connections": m.max_connections, "max-channels": m.max_channels},
    )


class Api:
    """The few management API calls relayd makes; a 404 reads as None."""

    def __init__(self, settings: Management) -> None:
        url = urlsplit(settings.url)
        self._https = url.scheme == "https"
        self._host = url.hostname or "localhost"
        self._port = url.port or (443 if self._https else 80)
        self._prefix = url.path.rstrip("/") + "/api"
        credentials = f"{settings.username}:{settings.password}".encode()
        self._auth = "Basic " + base64.b64encode(credentials).decode()
        self._timeout = settings.timeout
        self._context = (ssl.create_default_context(
            cafile=str(settings.ca_file) if settings.ca_file else None)
            if self._https else None)

    def call(self, method: str, *path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> Any:
        """One request; the decoded JSON answer, None for 404, ProvisionError otherwise."""
        target = self._prefix + "".join("/" + quote(part, safe="") for part in path)
        connection = (http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                                  context=self._context) if self._https
                      else http.client.HTTPConnection(self._host, self._port,
                                                      timeout=self._timeout))
        try:
            connection.request(method, target, None if body is None else orjson.dumps(body), {
                "Authorization": self._auth, "Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            data = response.read()
        except http.client.HTTPException as exc:
            raise ProvisionError(f"management API: {type(exc).__name__}") from None
        finally:
            connection.close()
        if response.status == 404:
            return None
        if response.status >= 300:
            raise ProvisionError(f"management API: {method} {'/'.join(path[:1])}: "
                                 f"{response.status} {_reason(data)}")
        return orjson.loads(data) if data else {}

    def user(self, name: str) -> dict[str, Any] | None:
        user: dict[str, Any] | None = self.call("GET", "users", name)
        return user

    def put_user(self, name: str, tags: list[str], password: str | None) -> None:
        """Create or replace a user; without a password it cannot log in with one."""
        body: dict[str, Any] = {"tags": ",".join(tags)}
        if password is None:
            body["password_hash"] = ""
        else:
            body["password"] = password
        self.call("PUT", "users", name, body=body)

    def connections(self, user: str) -> int:
        """How many connections `user` has open."""
        return len(self.call("GET", "connections", "username", user) or [])

    def close_connections(self, user: str, reason: str = "credentials revoked") -> None:
        self.call("DELETE", "connections", "username", user,
                  headers={"X-Reason": f"relayd: {reason}"})


def _reason(data: bytes) -> str:
    try:
        return str(orjson.loads(data).get("reason", ""))[:200]
    except (orjson.JSONDecodeError, AttributeError):
        return ""


def _auth_of(user: dict[str, Any]) -> Auth | None:
    """relayd's auth mode for a user it created; None for a user it did not create."""
    tags = user.get("tags") or []
    if isinstance(tags, str):
        tags = tags.split(",")
    if OWNED_TAG not in tags:
        return None
    return "x509" if X509_TAG in tags else "password"


def _ours(api: Api, name: str) -> tuple[dict[str, Any] | None, Auth | None]:
    user = api.user(name)
    return user, (_auth_of(user) if user is not None else None)


def ensure(api: Api, g: Grant) -> list[str]:
    """Create or correct the user, its permissions and limits; return what changed.

    A new password user gets no password here: `issue_password` sets it as the last step,
    so an interrupted run is completed, not lost, by running it again.
    """
    changed = []
    user, auth = _ours(api, g.user)
    if user is None:
        api.put_user(g.user, g.tags, password=None)
        changed.append("user")
    elif auth is None:
        raise ProvisionError(f"RabbitMQ user {g.user} exists and was not created by relayd")
    elif auth != g.auth:
        raise ProvisionError(f"RabbitMQ user {g.user} exists with {auth} auth: remove it first")
    permissions = api.call("GET", "permissions", g.vhost, g.user) or {}
    if {k: permissions.get(k) for k in g.permissions} != g.permissions:
        api.call("PUT", "permissions", g.vhost, g.user, body=g.permissions)
        changed.append("permissions")
    topic = [p for p in api.call("GET", "topic-permissions", g.vhost, g.user) or []
             if p.get("exchange") == g.topic["exchange"]]
    if not topic or {k: topic[0].get(k) for k in g.topic} != g.topic:
        api.call("PUT", "topic-permissions", g.vhost, g.user, body=g.topic)
        changed.append("topic permission")
    limits: dict[str, Any] = {}
    for entry in api.call("GET", "user-limits", g.user) or []:
        limits.update(entry.get("value", {}))
    for name, value in g.limits.items():
        if limits.get(name) != value:
            api.call("PUT", "user-limits", g.user, name, body={"value": value})
            changed.append(name)
    return changed


def regrant(api: Api, settings: Settings, business_id: str, amqp_user: str,
            secret: bytes) -> bool:
    """Give a user relayd provisioned what `grant` gives it now (after an upgrade: its
    inbox's new name) and, if that changed anything, close its connections, so that it
    goes on under the new grant only. False if relayd does not manage that user."""
    user, auth = _ours(api, amqp_user)
    if user is None or auth is None:
        return False
    if ensure(api, grant(settings, business_id, amqp_user, auth, secret)):
        api.close_connections(amqp_user, "permissions changed")
    return True


def new_password() -> str:
    return secrets.token_urlsafe(32)


def issue_password(api: Api, g: Grant) -> str | None:
    """A first password for a password user that has none yet; None in every other case."""
    user, auth = _ours(api, g.user)
    if g.auth != "password" or user is None or auth != "password" or user.get("password_hash"):
        return None
    password = new_password()
    api.put_user(g.user, g.tags, password)
    return password


def rotate(api: Api, name: str) -> str:
    """A new password for a relayd password user; its open connections are closed, so
    whoever held the old password is cut off."""
    user, auth = _ours(api, name)
    if user is None:
        raise ProvisionError(f"RabbitMQ user {name} does not exist: run business add")
    if auth is None:
        raise ProvisionError(f"RabbitMQ user {name} was not created by relayd")
    if auth == "x509":
        raise ProvisionError(f"RabbitMQ user {name} logs in with a certificate only: issue a "
                             f"new certificate with CN={name} from your CA instead")
    password = new_password()
    api.put_user(name, [OWNED_TAG], password)
    api.close_connections(name)
    return password


@dataclass(frozen=True, slots=True)
class Revoked:
    user: Literal["deleted", "absent", "not_ours"]
    connections_closed: int


def revoke(api: Api, name: str) -> Revoked:
    """Delete the user (its permissions and limits go with it), then close its connections.

    Deleting first means no new connection can log in while the old ones are closed
    (RabbitMQ 3.10 closes them itself on delete; closing them again is harmless). A user
    relayd did not create is left alone.
    """
    user, auth = _ours(api, name)
    if user is not None and auth is None:
        return Revoked("not_ours", 0)
    cut_off = api.connections(name)
    if user is not None:
        api.call("DELETE", "users", name)
    api.close_connections(name)
    return Revoked("deleted" if user is not None else "absent", cut_off)


def write_secret(path: Path, secret: str) -> None:
    """Write `secret` to `path`, readable by its owner only (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(secret + "\n")
