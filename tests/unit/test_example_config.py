"""config/relayd.example.yaml: it loads, names every settings key, and shows the defaults."""

from __future__ import annotations

import itertools
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from relayd import config
from relayd.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "relayd.example.yaml"
REQUIRED = {"amqp.url", "store.url", "keys.dir"}
# optional blocks, commented out: amqp.management (its password must not be a
# placeholder) and vault.tls (set, it replaces amqp.tls for the vault)
COMMENTED_SECTION = "(?:management|tls)"
COMMENTED = ("amqp.management.", "vault.tls.")


def _section(annotation: Any) -> type[BaseModel] | None:
    """The settings model an annotation holds (`Management | None` too), or None for a leaf."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if _section(a) is not None]
        return _section(models[0]) if models else None
    return None


def _leaves(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every leaf field of `model` and its nested sections, as (dotted key, field)."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _section(field.annotation)
        if nested is None:
            yield key, field
        else:
            yield from _leaves(nested, key + ".")


def _uncommented(text: str, section: str = COMMENTED_SECTION) -> str:
    """The example with the commented-out `section` block turned back into YAML."""
    out: list[str] = []
    block: str | None = None  # the indentation of the block we are in, if any
    for line in text.splitlines():
        header = re.fullmatch(rf"(\s*)# ({section}:)\s*", line)
        if header:
            block = header.group(1)
            out.append(block + header.group(2))
            continue
        if block is not None and line.startswith(block + "#   "):
            out.append(block + " " + line[len(block) + 1:])  # '#' becomes a space
            continue
        block = None
        out.append(line)
    return "\n".join(out) + "\n"


def _lookup(data: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            raise KeyError(key)
        data = data[part]
    return data


@pytest.fixture(scope="module")
def text() -> str:
    return EXAMPLE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def full(text: str) -> dict[str, Any]:
    """The example as YAML, with the commented management block included."""
    data: dict[str, Any] = yaml.safe_load(_uncommented(text))
    return data


class TestExampleConfig:
    def test_loads_and_validates(self) -> None:
        """The example file loads as valid settings with no environment overrides."""
        settings = config.load(EXAMPLE, environ={})
        assert isinstance(settings, config.Settings)
        assert settings.amqp.management is None

    def test_required_keys_hold_the_deployment_values(self) -> None:
        """The three required keys are set, to the documented deployment paths."""
        settings = config.load(EXAMPLE, environ={})
        assert settings.amqp.url.startswith(("amqp://", "amqps://"))
        assert settings.store.url == "sqlite:////var/lib/relayd/relayd.db"
        assert settings.keys.dir == Path("/etc/relayd/keys")
        required = {key for key, field in _leaves(config.Settings)
                    if field.is_required() and not key.startswith("amqp.management.")}
        assert required == REQUIRED

    def test_every_settings_key_is_in_the_example(self, full: dict[str, Any]) -> None:
        """Every field of every section, nested TLS and management included, is a key."""
        keys = [key for key, _ in _leaves(config.Settings)]
        assert any(key.startswith("amqp.tls.") for key in keys)
        assert any(key.startswith("amqp.management.") for key in keys)
        missing = []
        for key in keys:
            try:
                _lookup(full, key)
            except KeyError:
                missing.append(key)
        assert missing == []

    def test_every_key_has_a_comment(self, text: str) -> None:
        """Each key line, in the management block too, follows a comment saying what it does."""
        lines = [line for line in _uncommented(text).splitlines() if line.strip()]
        undocumented = [line.strip() for before, line in itertools.pairwise(lines)
                        if re.match(r"\s*[a-z_]+: \S", line)
                        and not before.lstrip().startswith("#")]
        assert undocumented == []

    def test_values_are_the_defaults(self, full: dict[str, Any]) -> None:
        """Every key that is not required is shown with its default value."""
        settings = config.load(EXAMPLE, environ={})
        checked, wrong = 0, {}
        for key, field in _leaves(config.Settings):
            if field.is_required():
                continue
            if key.startswith(COMMENTED):
                shown = _lookup(full, key)  # not loaded: the block is commented out
            else:
                shown = _lookup(settings.model_dump(), key)
            checked += 1
            if shown != field.default:
                wrong[key] = (shown, field.default)
        assert wrong == {}
        assert checked == len(list(_leaves(config.Settings))) - len(REQUIRED) - 3

    def test_commented_management_block_is_complete(self, full: dict[str, Any]) -> None:
        """Uncommented, the management block is whole and only its placeholder is refused."""
        with pytest.raises(ConfigError) as caught:
            config.parse(full, environ={})
        assert set(caught.value.problems) == {"amqp.management.password"}
        real = {**full["amqp"]["management"], "password": "a-real-secret-0f3c"}
        settings = config.parse({**full, "amqp": {**full["amqp"], "management": real}},
                                environ={})
        assert settings.amqp.management is not None
