"""Bash completion, generated from the parser and run by a real bash."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from relayd import cli
from relayd.completion import bash_completion

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "relayd"
    path.write_text(bash_completion(cli.parser()))
    return path


def complete(script: Path, line: str, cwd: Path | None = None) -> list[str]:
    """What bash offers for the last word of `line` (empty after a trailing space)."""
    words = line.split(" ")
    program = (f"source {shlex.quote(str(script))}\n"
               f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
               f"COMP_CWORD={len(words) - 1}\n"
               '_relayd\nprintf "%s\\n" "${COMPREPLY[@]}"\n')
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], cwd=cwd,
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return [word for word in out.splitlines() if word]


class TestBashCompletion:
    def test_commands_without_the_internal_worker(self, script: Path) -> None:
        """At the top: every command an operator uses, and not `worker`."""
        offered = complete(script, "relayd ")
        assert {"run", "status", "business", "device", "gdpr", "keys", "check-config",
                "--version"} <= set(offered)
        assert "worker" not in offered
        assert complete(script, "relayd bu") == ["business"]

    def test_subcommands_and_options(self, script: Path) -> None:
        """A group offers its commands; a command its options, after a positional too."""
        assert set(complete(script, "relayd business ")) == {
            "add", "list", "remove", "rotate-credentials"}
        assert "--amqp-user" in complete(script, "relayd business add acme --")
        assert "--json" in complete(script, "relayd topology declare --j")

    def test_choices_and_files(self, script: Path, tmp_path: Path) -> None:
        """--role and --kem offer their choices; --config offers files."""
        assert set(complete(script, "relayd run --role ")) == {
            "inbound", "outbound", "gdpr", "edge", "retention", "all"}
        assert complete(script, "relayd keys generate --kem MLKEM") == ["MLKEM768_X25519"]
        (tmp_path / "relayd.yaml").write_text("")
        assert complete(script, "relayd status --config rel", cwd=tmp_path) == ["relayd.yaml"]

    def test_free_values_offer_nothing(self, script: Path) -> None:
        """An option's free value (a user id) is not completed with command names."""
        assert complete(script, "relayd gdpr erase --user ") == []


class TestHelp:
    def test_every_argument_has_help(self) -> None:
        """Every option and positional of every listed command says what it is for."""
        commands = [cli.parser()]
        missing = []
        while commands:
            parser = commands.pop()
            for action in parser._actions:
                if action.choices and isinstance(action.choices, dict):  # subcommands
                    commands += action.choices.values()
                elif not action.help and parser.prog != "relayd worker":
                    missing.append(f"{parser.prog} {action.dest}")
        assert missing == []

    def test_help_shows_the_default_config_and_hides_worker(
            self, capsys: pytest.CaptureFixture[str]) -> None:
        """`relayd status --help` names the default config; `relayd --help` lists no
        worker."""
        with pytest.raises(SystemExit):
            cli.main(["status", "--help"])
        assert "default: /etc/relayd/relayd.yaml" in " ".join(capsys.readouterr().out.split())
        with pytest.raises(SystemExit):
            cli.main(["--help"])
        listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()
                  if line.startswith("    ")]
        assert "run" in listed
        assert "worker" not in listed
