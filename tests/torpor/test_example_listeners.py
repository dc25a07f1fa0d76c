"""The example config shows every address torpor binds, so a reader sees them all."""

from __future__ import annotations

from pathlib import Path

import yaml

from torpor.config import load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "torpor.yaml"


def test_the_example_lists_every_listener() -> None:
    text = EXAMPLE.read_text()
    raw = yaml.safe_load(text)
    config = load_config(EXAMPLE)
    for key, address in config.listeners().items():
        section, name = key.split(".")
        if address.unix is not None:  # a socket by default: named in the comments
            assert f"unix:torpor-logs/{address.unix.name}" in text, key
        else:
            assert name in raw[section], f"{key} is not in examples/torpor.yaml"
    assert "used by a standalone `torpor activator` only" in text  # activator.metrics
