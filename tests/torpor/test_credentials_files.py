"""API key and JWKS files (or a JWKS URL): what they may hold, and the config errors that
name them."""

from __future__ import annotations

from pathlib import Path

import pytest

from assembly import cli
from torpor import credentials_files
from torpor.config import NO_AUTH, load_config, service_auth
from torpor.credentials_files import jwks_ca_file, read_api_keys, read_ca_bundle, read_jwks
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


# --- a JWKS fetched from a URL ---------------------------------------------------------


def jwt_config(tmp_path: Path, jwt: str) -> Path:
    path = tmp_path / "torpor.yaml"
    path.write_text(f"gateway: {{auth: {{jwt: {{issuer: 'https://issuer.test', {jwt}}}}}}}\n"
                    "services:\n  - {name: a, host: a.test, local: {command: [x]}}\n")
    return path


def test_a_jwks_url_with_its_defaults_and_settings(tmp_path: Path) -> None:
    config = load_config(jwt_config(tmp_path, "jwks_url: 'http://127.0.0.1:8000/jwks'"))
    assert config.gateway.auth is not None and config.gateway.auth.jwt is not None
    jwt = config.gateway.auth.jwt
    assert (jwt.jwks, jwt.jwks_url) == (None, "http://127.0.0.1:8000/jwks")
    assert (jwt.jwks_cache, jwt.jwks_timeout, jwt.jwks_ca) == (300.0, 5.0, None)
    ca = tmp_path / "ca.pem"
    ca.write_text(read_ca_bundle(jwks_ca_file(None)))
    config = load_config(jwt_config(
        tmp_path, "jwks_url: 'https://login.example.com/keys', jwks_cache: 1h, "
                  "jwks_timeout: 2s, jwks_ca: ca.pem"))
    assert config.gateway.auth is not None and config.gateway.auth.jwt is not None
    jwt = config.gateway.auth.jwt
    assert (jwt.jwks_cache, jwt.jwks_timeout, jwt.jwks_ca) == (3600.0, 2.0, ca)


@pytest.mark.parametrize(("jwt", "key", "words"), [
    ("audiences: [x]", "gateway.auth.jwt", "give exactly one of jwks (a JWKS file) or jwks_url"),
    ("jwks: jwks.json, jwks_url: 'http://h.test/k'", "gateway.auth.jwt",
     "give exactly one of jwks (a JWKS file) or jwks_url"),
    ("jwks: jwks.json, jwks_cache: 1m", "gateway.auth.jwt.jwks_cache", "only with jwks_url"),
    ("jwks: jwks.json, jwks_ca: ca.pem", "gateway.auth.jwt.jwks_ca", "only with jwks_url"),
    ("jwks_url: 'ftp://h.test/k'", "gateway.auth.jwt.jwks_url", "an http or https URL"),
    ("jwks_url: 'https:///k'", "gateway.auth.jwt.jwks_url", "an http or https URL"),
    ("jwks_url: 'https://u:p@h.test/k'", "gateway.auth.jwt.jwks_url", "without user"),
    ("jwks_url: 'https://h.test:99999/k'", "gateway.auth.jwt.jwks_url", "an http or https URL"),
    ("jwks_url: 'https://h.test:0/k'", "gateway.auth.jwt.jwks_url", "a port from 1"),
    ("jwks_url: 'http://h.test/k', jwks_cache: 0s", "gateway.auth.jwt.jwks_cache",
     "from 1s to 86400s"),
    ("jwks_url: 'http://h.test/k', jwks_cache: 2d", "gateway.auth.jwt.jwks_cache",
     "from 1s to 86400s"),
    ("jwks_url: 'http://h.test/k', jwks_timeout: 5m", "gateway.auth.jwt.jwks_timeout",
     "from 0.1s to 60s"),
    ("jwks_url: 'http://h.test/k', jwks_ca: ca.pem", "gateway.auth.jwt.jwks_ca",
     "only with an https jwks_url"),
    ("jwks_url: 'https://h.test/k', jwks_ca: missing.pem", "gateway.auth.jwt.jwks_ca",
     "cannot read the CA certificates"),
    ("jwks_url: 'https://h.test/k', jwks_ca: jwks.json", "gateway.auth.jwt.jwks_ca",
     "is not a PEM file of CA certificates"),
    ("jwks_urls: 'https://h.test/k'", "gateway.auth.jwt.jwks_urls", "did you mean 'jwks_url'"),
])
def test_bad_jwks_settings_name_the_key(tmp_path: Path, jwt: str, key: str,
                                        words: str) -> None:
    (tmp_path / "jwks.json").write_text('{"keys": [{"kty": "EC"}]}')
    (tmp_path / "ca.pem").write_text(read_ca_bundle(jwks_ca_file(None)))
    path = jwt_config(tmp_path, jwt)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == key, str(caught.value)
    assert words in str(caught.value) and str(path) in str(caught.value)


def test_a_bad_jwks_url_is_a_config_error_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = jwt_config(tmp_path, "jwks_url: 'ftp://h.test/k'")
    assert cli.main(["envoy-bootstrap", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "gateway.auth.jwt.jwks_url" in err and "Traceback" not in err


def test_without_a_system_ca_bundle_https_needs_jwks_ca(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(credentials_files, "_SYSTEM_BUNDLES", ())
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "none.pem"))
    with pytest.raises(ConfigError) as caught:
        load_config(jwt_config(tmp_path, "jwks_url: 'https://h.test/k'"))
    assert caught.value.key == "gateway.auth.jwt.jwks_ca"
    assert "no system CA bundle found" in str(caught.value)
