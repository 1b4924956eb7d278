"""relayd.log: the redaction layer and the exception rendering, through the real renderer."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from relayd import log
from relayd.config import Logging
from relayd.opaque import reference

USER = "alice@example.org"


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """Log lines rendered as relayd renders them for journald, into a buffer."""
    stream = io.StringIO()
    log.setup(Logging(level="debug", format="json"), stream=stream)
    try:
        yield stream
    finally:
        log.reset()


def parsed(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


class TestRedact:
    def test_safe_keys_keep_their_values(self, lines: io.StringIO) -> None:
        """Stage, outcome, reason, latency and kid reach the line as they are."""
        log.get().info("handled", stage="inbound", outcome="dead_lettered", reason="stale",
                       latency_ms=1.5, kid="r2026-11", abandoned=0)
        [line] = parsed(lines)
        assert line["event"] == "handled"
        assert (line["stage"], line["outcome"], line["reason"]) == (
            "inbound", "dead_lettered", "stale")
        assert (line["latency_ms"], line["kid"], line["abandoned"]) == (1.5, "r2026-11", 0)

    def test_other_keys_become_references(self, lines: io.StringIO) -> None:
        """A user id under any other key is replaced by a stable keyed reference."""
        log.get().info("seen", user=USER, device="phone-1")
        log.get().info("seen", user=USER)
        first, second = parsed(lines)
        assert USER not in lines.getvalue()
        assert "phone-1" not in lines.getvalue()
        assert first["user"].startswith("ref:")
        assert first["user"] == second["user"]
        assert first["user"] != first["device"]

    def test_reference_depends_on_the_secret(self, lines: io.StringIO) -> None:
        """References are keyed: another relay secret names the same value differently."""
        log.get().info("seen", user=USER)
        log.set_reference_secret(b"\x01" * 32)
        log.get().info("seen", user=USER)
        first, second = parsed(lines)
        assert first["user"] != second["user"]

    def test_event_text_with_data_is_hashed(self, lines: io.StringIO) -> None:
        """An event that is not a plain identifier (an f-string, say) is not printed."""
        log.get().info(f"message from {USER}")
        [line] = parsed(lines)
        assert USER not in lines.getvalue()
        assert line["event"].startswith("ref:")

    def test_counts_pass_as_integers_only(self, lines: io.StringIO) -> None:
        """A count key shows an integer, but a list of ids under it is hashed."""
        log.get().info("retention", expired=3, devices=["phone-1"])
        [line] = parsed(lines)
        assert line["expired"] == 3
        assert line["devices"].startswith("ref:")
        assert "phone-1" not in lines.getvalue()

    def test_user_ref_passes_only_as_a_reference(self, lines: io.StringIO) -> None:
        """user_ref keeps an opaque.reference() value (to match the audit trail), and hashes
        anything else, such as the user id itself."""
        ref = reference(b"\x02" * 32, "user", USER)
        log.get().info("erased", user_ref=ref)
        log.get().info("erased", user_ref=USER)
        first, second = parsed(lines)
        assert first["user_ref"] == ref
        assert second["user_ref"].startswith("ref:")
        assert USER not in lines.getvalue()

    def test_structured_values_under_safe_keys_are_hashed(self, lines: io.StringIO) -> None:
        """A dict under a safe key (a payload by mistake) is hashed, not printed."""
        log.get().info("handled", reason={"text": "my secret"})
        assert "my secret" not in lines.getvalue()
        assert parsed(lines)[0]["reason"].startswith("ref:")


class TestExceptions:
    def test_exception_message_is_never_rendered(self, lines: io.StringIO) -> None:
        """A logged exception shows its type, its cause's type and frames, not its text."""
        def lookup() -> None:
            try:
                {}[USER]
            except KeyError as exc:
                raise ValueError(f"no device for {USER}") from exc

        try:
            lookup()
        except ValueError:
            log.get().exception("handler_failed", stage="inbound")
        [line] = parsed(lines)
        assert USER not in lines.getvalue()
        assert (line["error"], line["cause"]) == ("ValueError", "KeyError")
        assert any("test_log.py" in frame for frame in line["trace"])

    def test_library_records_keep_only_their_template(self, lines: io.StringIO) -> None:
        """A library's log record keeps its format string; the arguments are dropped."""
        logging.getLogger("aiormq.connection").warning("Connection to %s lost", USER)
        [line] = parsed(lines)
        assert USER not in lines.getvalue()
        assert (line["event"], line["logger"], line["template"]) == (
            "library", "aiormq.connection", "Connection to %s lost")


class TestLibraryRecordsAtTheRoot:
    def test_a_message_that_is_no_literal_becomes_a_reference(self, lines: io.StringIO) -> None:
        """A library message built from input (not a string literal of the code that logged
        it) is never rendered: it becomes a keyed reference, and the line says which logger."""
        logging.getLogger("aiormq.connection").warning(f"Connection to {USER} lost")
        [line] = parsed(lines)
        assert USER not in lines.getvalue()
        assert "template" not in line
        assert line["message"].startswith("ref:")
        assert line["logger"] == "aiormq.connection"

    def test_a_message_that_is_not_a_string_gives_only_a_reference(
            self, lines: io.StringIO) -> None:
        """An object logged as the message (an exception, say) is a reference too."""
        logging.getLogger("aio_pika").error(ValueError(USER))
        assert USER not in lines.getvalue()
        assert parsed(lines)[0]["message"].startswith("ref:")

    def test_task_exception_never_retrieved_keeps_no_input(self, lines: io.StringIO) -> None:
        """asyncio's own "Task exception was never retrieved" line, whose text carries the
        exception's repr, is logged as a reference with the exception's type and frames."""
        async def fail() -> None:
            raise ValueError(f"no device {USER}")

        async def main() -> None:
            task = asyncio.get_running_loop().create_task(fail())
            await asyncio.wait([task])
            del task
            gc.collect()

        asyncio.run(main())
        [line] = parsed(lines)
        assert USER not in lines.getvalue()
        assert (line["logger"], line["error"]) == ("asyncio", "ValueError")
        assert line["message"].startswith("ref:")

    def test_the_loop_handler_logs_type_and_frames_only(self, lines: io.StringIO) -> None:
        """With relayd's loop exception handler, a failed task is one loop_exception line:
        its type and frames, no message, no repr of the task."""
        async def fail() -> None:
            raise KeyError(USER)

        async def main() -> None:
            log.guard_loop()
            task = asyncio.get_running_loop().create_task(fail())
            await asyncio.wait([task])
            del task
            gc.collect()

        asyncio.run(main())
        [line] = parsed(lines)
        assert USER not in lines.getvalue()
        assert (line["event"], line["error"]) == ("loop_exception", "KeyError")
        assert any("test_log.py" in frame for frame in line["trace"])

    def test_warnings_keep_their_category_and_place_only(self, lines: io.StringIO) -> None:
        """A Python warning is logged as its category and file:line, never its text."""
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn(f"odd value {USER}", RuntimeWarning, stacklevel=1)
        [line] = parsed(lines)
        assert USER not in lines.getvalue()
        assert (line["event"], line["type"]) == ("python_warning", "RuntimeWarning")
        assert line["trace"][0].startswith("unit/test_log.py:")


class TestLevel:
    def test_set_level_applies_to_existing_loggers(self, lines: io.StringIO) -> None:
        """After set_level, a logger made before it filters at the new level."""
        logger = log.get("relayd.test")
        logger.info("before")
        log.set_level("warning")
        logger.info("hidden")
        logger.warning("shown")
        assert [line["event"] for line in parsed(lines)] == ["before", "shown"]


class TestJournalPriority:
    @pytest.fixture
    def journal(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
        """A file that $JOURNAL_STREAM names as the journal, as systemd names its socket."""
        path = tmp_path / "journal"
        with path.open("w") as stream:
            info = os.fstat(stream.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
            log.setup(Logging(level="debug", format="json"), stream=stream)
            try:
                yield path
            finally:
                log.reset()

    def test_lines_carry_their_level_as_a_syslog_priority(self, journal: Path) -> None:
        """On the journal, each JSON line starts with <N>: debug 7, info 6, warning 4,
        error 3, critical 2, and a library's warning 4."""
        logger = log.get("relayd.test")
        logger.debug("d")
        logger.info("i")
        logger.warning("w")
        logger.error("e")
        logger.critical("c")
        logging.getLogger("aiormq.connection").warning("lost")
        lines = journal.read_text().splitlines()
        assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>", "<4>"]
        assert [orjson.loads(line[3:])["event"] for line in lines] == [
            "d", "i", "w", "e", "c", "library"]

    def test_no_prefix_elsewhere(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A stream that is not the one $JOURNAL_STREAM names (a file, a pipe, a buffer)
        gets plain JSON lines."""
        other = tmp_path / "other"
        monkeypatch.setenv("JOURNAL_STREAM", "1:2")
        try:
            with other.open("w") as stream:
                log.setup(Logging(level="info", format="json"), stream=stream)
                log.get().warning("w")
        finally:
            log.reset()
        assert orjson.loads(other.read_text())["event"] == "w"
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not log.to_journal(io.StringIO())
