"""Who may call each service, as Envoy checks it: the API key and JWKS files behind
`gateway.auth` and `services[].auth`, read, kept current, and turned into the routes'
requirements (resources.RouteAuth).

Owns: reading the files (torpor/credentials_files.py) once per path, reading them again
when they change (`check`, every control_plane.reload_poll), and what a file that cannot
be read means: an edit that breaks a file keeps what Envoy has (logged, counted); a file
never read successfully lets nobody in (its routes ask for a key no one has), never
everyone.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from torpor import metrics
from torpor.config import GatewayConfig, JwtConfig, ServiceConfig, service_auth
from torpor.credentials_files import read_api_keys, read_jwks
from torpor.logs import event
from xds_server.resources import ApiKeys, JwtRule, RouteAuth

log = logging.getLogger("torpor.auth")
T = TypeVar("T")

#: What a service whose key file was never readable gets: a key list no caller matches.
NOBODY = ApiKeys(())


class Credentials:
    """The current contents of every auth file a service uses."""

    def __init__(self, gateway: GatewayConfig) -> None:
        self._gateway = gateway
        self._keys: dict[Path, ApiKeys] = {}
        self._jwks: dict[Path, str] = {}

    def route_auth(self, service: ServiceConfig) -> RouteAuth | None:
        """What Envoy asks of `service`'s callers (None: nothing)."""
        auth = service_auth(service, self._gateway)
        if auth is None:
            return None
        if auth.api_keys is not None:
            return self._api_keys(auth.api_keys)
        assert auth.jwt is not None
        jwks = self._jwks_of(auth.jwt.jwks)
        if jwks is None:
            return NOBODY
        return JwtRule(provider=_provider(auth.jwt), issuer=auth.jwt.issuer,
                       audiences=auth.jwt.audiences, jwks=jwks)

    def check(self) -> bool:
        """Read every known file again; True when one changed (and was good)."""
        keys = _reread(self._keys, lambda path: _as_keys(read_api_keys(path)))
        jwks = _reread(self._jwks, read_jwks)
        return keys or jwks

    async def run(self, every: float, on_change: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(every)
            if self.check():
                on_change()

    def _api_keys(self, path: Path) -> ApiKeys:
        if path not in self._keys:
            try:
                self._keys[path] = _as_keys(read_api_keys(path))
            except ValueError as exc:
                _failed(path, exc)
                return NOBODY
        return self._keys[path]

    def _jwks_of(self, path: Path) -> str | None:
        if path not in self._jwks:
            try:
                self._jwks[path] = read_jwks(path)
            except ValueError as exc:
                _failed(path, exc)
                return None
        return self._jwks[path]


def _reread(cache: dict[Path, T], read: Callable[[Path], T]) -> bool:
    """Each cached file read again: a good change replaces the cached value, a failure
    keeps it (logged); True when something changed."""
    changed = False
    for path, before in list(cache.items()):
        try:
            now = read(path)
        except ValueError as exc:
            _failed(path, exc)
            continue
        if now != before:
            cache[path] = now
            changed = _reloaded(path)
    return changed


def _as_keys(keys: dict[str, str]) -> ApiKeys:
    return ApiKeys(tuple(sorted(keys.items())))


def _provider(jwt: JwtConfig) -> str:
    """One JWT provider per (issuer, JWKS file, audiences): a stable name for it."""
    seed = "\\0".join([jwt.issuer, str(jwt.jwks), *jwt.audiences]).encode()
    return "jwt_" + hashlib.sha256(seed).hexdigest()[:12]


def _failed(path: Path, exc: ValueError) -> None:
    event(log, "auth.reload_failed", level=logging.ERROR, file=str(path), error=str(exc))
    metrics.AUTH_RELOADS.labels(result="failed").inc()


def _reloaded(path: Path) -> bool:
    event(log, "auth.reloaded", file=str(path))
    metrics.AUTH_RELOADS.labels(result="applied").inc()
    return True
