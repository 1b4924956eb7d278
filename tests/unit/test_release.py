"""A release: one version, from pyproject.toml; a changelog section for it; the licence
the package declares."""

from __future__ import annotations

import re
import tomllib
from datetime import date
from pathlib import Path

import relayd

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
HEADING = re.compile(r"^## \[(?P<name>[^\]]+)\](?: - (?P<date>\d{4}-\d{2}-\d{2}))?$", re.M)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


class TestVersion:
    def test_the_package_reports_the_version_of_pyproject(self) -> None:
        """relayd.__version__ is pyproject's version, read from the installed metadata."""
        assert relayd.__version__ == PROJECT["version"]

    def test_no_other_file_writes_it(self) -> None:
        """No module carries a version literal of its own."""
        literal = re.compile(r"""(__version__|VERSION)\s*=\s*["']\d+\.\d+""")
        assert not [p for p in (ROOT / "relayd").rglob("*.py") if literal.search(p.read_text())]


class TestChangelog:
    def test_keep_a_changelog_shape(self) -> None:
        """Unreleased first, then releases newest first, each with an ISO date not in the
        future; the current version has its section."""
        headings = list(HEADING.finditer((ROOT / "CHANGELOG.md").read_text()))
        assert headings[0]["name"] == "Unreleased"
        assert headings[0]["date"] is None
        releases = [(h["name"], h["date"]) for h in headings[1:]]
        assert releases, "no release section"
        assert all(day is not None and date.fromisoformat(day) <= date.today()
                   for _, day in releases)
        versions = [_version(name) for name, _ in releases]
        assert versions == sorted(versions, reverse=True)
        assert len(set(versions)) == len(versions)
        assert PROJECT["version"] in [name for name, _ in releases]

    def test_sections_use_the_standard_kinds(self) -> None:
        """Every subsection is one of Keep a Changelog's kinds."""
        kinds = set(re.findall(r"^### (.+)$", (ROOT / "CHANGELOG.md").read_text(), re.M))
        assert kinds <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}


class TestLicence:
    def test_license_file_is_the_declared_licence(self) -> None:
        """pyproject declares Apache-2.0 and LICENSE is its full text."""
        assert PROJECT["license"] == "Apache-2.0"
        text = (ROOT / "LICENSE").read_text()
        assert "Apache License\n                           Version 2.0, January 2004" in text
        assert "END OF TERMS AND CONDITIONS" in text
        assert "APPENDIX: How to apply the Apache License to your work." in text
