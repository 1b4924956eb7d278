"""The error tree and the process exit codes, each named in one place."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What `relayd` exits with, so systemd and operators can tell failures apart."""

    OK = 0
    FAILURE = 1  # anything not named below
    USAGE = 2  # bad command line (argparse's own code)
    NOT_FOUND = 3  # the business, device or user named does not exist
    UNAVAILABLE = 69  # EX_UNAVAILABLE: the broker or the database could not be reached
    SOFTWARE = 70  # EX_SOFTWARE: a bug
    CONFIG = 78  # EX_CONFIG: the config or the key files are wrong
    BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports it: stdout's reader went away


class RelaydError(Exception):
    """Base of every error relayd raises on purpose."""


class ConfigError(RelaydError):
    """The configuration is wrong; `problems` maps each dotted key to what is wrong with it."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{key}: {why}" for key, why in problems.items()))


class KeyFileError(ConfigError):
    """A key file is missing, malformed or readable by others."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__({f"keys ({path})": why})


class BrokerRefusedError(ConfigError, ConnectionError):
    """The broker refused relayd for a reason only the config or the broker's setup can
    cure. To a command it is a ConfigError: exit 78, with what to fix. To the daemon it is
    also a failed connection: workers log it (connect_failed, its type as the reason) and
    try again, so the relay comes up as soon as the broker is fixed."""


class VhostRefusedError(BrokerRefusedError):
    """The vhost of amqp.url does not exist, or its user has no permissions on it."""


class LoginRefusedError(BrokerRefusedError):
    """The broker refused the login of amqp.url's user (password or certificate)."""


class PermanentError(RelaydError):
    """The input can never be accepted: dead-letter it, or answer it, with `reason`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail or reason
        super().__init__(f"{reason}: {self.detail}")


class EnvelopeError(PermanentError):
    """A sealed envelope failed to open, verify or validate.

    `reason` is one of bad_kid, decrypt_failed, bad_signature, malformed, too_large,
    unknown_device, replayed, stale, wrong_device.
    """


class ReplyError(PermanentError):
    """A business reply the relay refuses; `reason` is the contract's error code."""


class TransientError(RelaydError):
    """A failure that may pass: retry later. `reason` is a short code for logs and metrics:
    unroutable, nacked, publish_failed, store_busy."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail or reason}")


class StoreError(RelaydError):
    """The store failed, not because of the message and not for a passing outage: a
    schema newer than this relayd, a row it cannot read, a statement the database
    refused. Every backend raises this, TransientError("store_busy") or
    StoreUnavailableError, and nothing else."""


class StoreUnavailableError(RelaydError):
    """The store cannot be reached (a database restart, a lost connection): retry later,
    without counting it against the message."""
