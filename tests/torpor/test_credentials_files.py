"""API key and JWKS files: what they may hold, and the config errors that name them."""

from __future__ import annotations

from pathlib import Path

import pytest

from torpor.config import NO_AUTH, load_config, service_auth
from torpor.credentials_files import read_api_keys, read_jwks
from torpor.errors import ConfigError

KEY = "k" * 20


@pytest.mark.parametrize(("text", "expected"), [
    (f"alice: {KEY}\n# a comment\n\nbob: {KEY}x  # trailing\n",
     {"alice": KEY, "bob": KEY + "x"}),
    (f"{KEY}\n", {"key-1": KEY}),
])
def test_api_key_files(tmp_path: Path, text: str, expected: dict[str, str]) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    assert read_api_keys(path) == expected


@pytest.mark.parametrize(("text", "words"), [
    ("alice: short\n", "at least 16 characters"),
    (f"alice: {KEY}\nbob: {KEY}\n", "the key of line 1 again"),
    (f"alice: {KEY}\nalice: {KEY}y\n", "client 'alice' listed twice"),
    (f"a lice: {KEY}\n", "a client name"),
])
def test_bad_api_key_files_name_the_line(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValueError, match=words):
        read_api_keys(path)


def test_a_jwks_needs_keys(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": []}')
    with pytest.raises(ValueError, match="holds no keys"):
        read_jwks(path)
    path.write_text("nope")
    with pytest.raises(ValueError, match="is not a JWKS file"):
        read_jwks(path)


def test_auth_sections(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"alice: {KEY}\n")
    path = tmp_path / "torpor.yaml"
    local = "local: {command: [x]}"
    path.write_text(f"gateway: {{auth: {{api_keys: {keys}}}}}\nservices:\n"
                    f"  - {{name: a, host: a.test, {local}}}\n"
                    f"  - {{name: b, host: b.test, auth: none, {local}}}\n")
    config = load_config(path)
    a, b = config.services
    assert service_auth(a, config.gateway) == config.gateway.auth
    assert b.auth == NO_AUTH and service_auth(b, config.gateway) is None
    path.write_text(f"services:\n  - {{name: a, host: a.test, auth: {{}}, {local}}}\n")
    with pytest.raises(ConfigError, match="give one of api_keys"):
        load_config(path)
    path.write_text(f"services:\n  - {{name: a, host: a.test, auth: {{api_keys: {tmp_path}/x}},"
                    f" {local}}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "services[0].auth.api_keys"
