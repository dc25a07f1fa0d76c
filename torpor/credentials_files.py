"""The files that say who may call a service: API keys and a JWKS.

Owns reading and checking them, for the config (at start: a bad file is a config error)
and the control plane (again when a file changes: a bad edit keeps what Envoy has).
The keys go to Envoy as they are (its API key filter compares them): keep the file
readable by torpor only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

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
