"""The files that say who may call a service: API keys, a JWKS, and the CA certificates an
https JWKS host is checked against.

Owns reading and checking them, for the config (at start: a bad file is a config error)
and the control plane (again when a file changes: a bad edit keeps what Envoy has).
The keys go to Envoy as they are (its API key filter compares them): keep the file
readable by torpor only.
"""

from __future__ import annotations

import json
import re
import ssl
import warnings
from pathlib import Path

from cryptography import x509

_CLIENT = re.compile(r"[A-Za-z0-9_.@-]{1,128}")


def read_api_keys(path: Path) -> dict[str, str]:
    """client → key, from lines `client: key` (or a bare `key`: client `key-<line>`);
    blank lines and `#` comments skipped. Raises ValueError naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the API keys in {path}: {exc}") from None
    keys: dict[str, str] = {}
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        client, colon, key = line.partition(":")
        client, key = (client.strip(), key.strip()) if colon else (f"key-{number}", line)
        if not _CLIENT.fullmatch(client):
            raise ValueError(f"{path}:{number}: a client name of letters, digits and "
                             f"'_.@-', got {client!r}")
        if len(key) < 16 or any(c.isspace() for c in key):
            raise ValueError(f"{path}:{number}: a key of at least 16 characters without "
                             "spaces (a short key is guessed)")
        if key in seen:
            raise ValueError(f"{path}:{number}: the key of line {seen[key]} again")
        if client in keys:
            raise ValueError(f"{path}:{number}: client {client!r} listed twice")
        seen[key] = number
        keys[client] = key
    return keys


def read_jwks(path: Path) -> str:
    """The JWKS file's text, checked to be a JSON object with a non-empty `keys` list."""
    try:
        text = path.read_text(encoding="utf-8")
        keys = json.loads(text).get("keys")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is not a JWKS file (JSON with a keys list): {exc}") \
            from None
    if not isinstance(keys, list) or not keys:
        raise ValueError(f"{path} holds no keys (a JWKS: {{\"keys\": [...]}})")
    return text


#: Where Linux distributions keep the system's CA bundle, after what Python's ssl module
#: reports (which honours SSL_CERT_FILE): Debian/Ubuntu, Fedora/RHEL, Alpine.
_SYSTEM_BUNDLES = (Path("/etc/ssl/certs/ca-certificates.crt"),
                   Path("/etc/pki/tls/certs/ca-bundle.crt"), Path("/etc/ssl/cert.pem"))


def jwks_ca_file(ca: Path | None) -> Path:
    """The CA bundle an https JWKS host's certificate is checked against: `ca` when given,
    else the system's trust store as one file (Envoy has no trust store of its own: the
    control plane sends it the certificates). Raises ValueError when there is none."""
    if ca is not None:
        return ca
    found = ssl.get_default_verify_paths().cafile
    candidates = ([Path(found)] if found else []) + list(_SYSTEM_BUNDLES)
    for path in candidates:
        if path.is_file():
            return path
    raise ValueError("no system CA bundle found (looked at "
                     f"{', '.join(str(p) for p in candidates)}); give jwks_ca: a PEM file "
                     "of the CA certificates that sign the JWKS host's certificate")


def read_ca_bundle(path: Path) -> str:
    """The PEM text of a CA bundle, checked to hold at least one certificate that parses.
    Raises ValueError naming the file."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the CA certificates in {path}: {exc}") from None
    try:
        with warnings.catch_warnings():
            # A system bundle may hold an old root that cryptography warns about (a
            # negative serial number); Envoy's TLS library takes it.
            warnings.simplefilter("ignore")
            x509.load_pem_x509_certificates(text.encode())
    except ValueError as exc:
        raise ValueError(f"{path} is not a PEM file of CA certificates: {exc}") from None
    return text
