"""The error tree and exit codes (relayd.errors)."""

from __future__ import annotations

from relayd.errors import (
    ConfigError,
    EnvelopeError,
    ExitCode,
    KeyFileError,
    PermanentError,
    RelaydError,
    ReplyError,
    TransientError,
)


class TestErrors:
    def test_hierarchy(self) -> None:
        """Every error is a RelaydError; envelope and reply errors are permanent."""
        assert issubclass(KeyFileError, ConfigError)
        assert issubclass(EnvelopeError, PermanentError)
        assert issubclass(ReplyError, PermanentError)
        for kind in (ConfigError, PermanentError, TransientError):
            assert issubclass(kind, RelaydError)
        assert not issubclass(TransientError, PermanentError)

    def test_config_error_names_each_key(self) -> None:
        """ConfigError keeps its problems and prints 'key: why' for each."""
        error = ConfigError({"workers.inbound": "must be >= 1", "amqp.url": "bad scheme"})
        assert error.problems == {"workers.inbound": "must be >= 1", "amqp.url": "bad scheme"}
        assert str(error) == "workers.inbound: must be >= 1; amqp.url: bad scheme"

    def test_key_file_error_names_the_path(self) -> None:
        """KeyFileError reports its problem under the file's path."""
        error = KeyFileError("/k/hpke-a.json", "is readable by others")
        assert error.problems == {"keys (/k/hpke-a.json)": "is readable by others"}

    def test_permanent_error_detail_defaults_to_reason(self) -> None:
        """A PermanentError without detail uses its reason as detail."""
        error = EnvelopeError("replayed")
        assert (error.reason, error.detail) == ("replayed", "replayed")
        assert str(EnvelopeError("stale", "too old")) == "stale: too old"

    def test_exit_codes_are_distinct(self) -> None:
        """Each exit code is distinct, aliases included; config errors exit 78, a lost
        broker or store 69."""
        codes = ExitCode.__members__.values()  # iterating ExitCode would skip aliases
        assert len({int(code) for code in codes}) == len(ExitCode.__members__)
        assert (ExitCode.CONFIG, ExitCode.UNAVAILABLE, ExitCode.OK) == (78, 69, 0)
