"""The relayd.yaml every tier writes for the relay it runs: one place for what they share."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

# Tests send far faster than people do; tests of the limits set tight ones themselves.
UNLIMITED = {"device_rate": 1e6, "device_burst": 1_000_000,
             "business_rate": 1e6, "business_burst": 1_000_000}


def write_config(root: Path, url: str, *layers: Mapping[str, Mapping[str, Any]]) -> Path:
    """`root`/relayd.yaml: the broker at `url`, the store and keys under `root`, JSON logs,
    no rate limits; then each layer's sections, key by key, the last one winning."""
    data: dict[str, Any] = {
        "amqp": {"url": url},
        "store": {"url": f"sqlite:///{root}/relayd.db"},
        "keys": {"dir": str(root / "keys")},
        "logging": {"format": "json"},
        "limits": dict(UNLIMITED),
    }
    for layer in layers:
        for name, values in layer.items():
            data.setdefault(name, {}).update(values)
    path = root / "relayd.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
