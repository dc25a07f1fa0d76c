"""Who may call each service, as Envoy checks it: the API key and JWKS files behind
`gateway.auth` and `services[].auth` (and the CA certificates of a JWKS URL's https host),
read, kept current, and turned into the routes' requirements (resources.RouteAuth).

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
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from torpor import metrics
from torpor.config import (
    NO_AUTH,
    AuthConfig,
    GatewayConfig,
    JwtConfig,
    ServiceConfig,
    service_auth,
)
from torpor.credentials_files import jwks_ca_file, read_api_keys, read_ca_bundle, read_jwks
from torpor.logs import event
from xds_server.resources import ApiKeys, JwksHost, JwtRule, RemoteJwks, RouteAuth

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
        self._cas: dict[Path, str] = {}  # CA certificates of https JWKS hosts

    def route_auth(self, service: ServiceConfig) -> RouteAuth | None:
        """What Envoy asks of `service`'s callers (None: nothing)."""
        return self._route_auth(service_auth(service, self._gateway))

    def gateway_auth(self) -> RouteAuth | None:
        """What gateway.auth asks of callers (None: nothing): the services that have no
        `auth` of their own ask the same."""
        auth = self._gateway.auth
        return self._route_auth(None if auth == NO_AUTH else auth)

    def _route_auth(self, auth: AuthConfig | None) -> RouteAuth | None:
        if auth is None:
            return None
        if auth.api_keys is not None:
            return self._api_keys(auth.api_keys)
        jwt = auth.jwt
        assert jwt is not None
        if jwt.jwks_url is not None:
            remote = self._remote(jwt, jwt.jwks_url)
            if remote is None:
                return NOBODY
            return JwtRule(provider=_provider(jwt), issuer=jwt.issuer,
                           audiences=jwt.audiences, jwks="", remote=remote)
        assert jwt.jwks is not None
        jwks = self._jwks_of(jwt.jwks)
        if jwks is None:
            return NOBODY
        return JwtRule(provider=_provider(jwt), issuer=jwt.issuer,
                       audiences=jwt.audiences, jwks=jwks)

    def check(self) -> bool:
        """Read every known file again; True when one changed (and was good)."""
        keys = _reread(self._keys, lambda path: _as_keys(read_api_keys(path)))
        jwks = _reread(self._jwks, read_jwks)
        cas = _reread(self._cas, self._ca_again)
        return keys or jwks or cas

    def _ca_again(self, path: Path) -> str:
        """A CA bundle read again, parsed only when its text changed (a system bundle is
        ~200 KB: ~4 ms to parse, every reload_poll)."""
        try:
            if path.read_text(encoding="ascii") == self._cas.get(path):
                return self._cas[path]
        except (OSError, UnicodeDecodeError):
            pass  # read_ca_bundle says why
        return read_ca_bundle(path)

    def _remote(self, jwt: JwtConfig, url: str) -> RemoteJwks | None:
        """Where Envoy fetches the JWKS; None when the CA certificates an https host is
        checked against were never readable."""
        parts = urllib.parse.urlsplit(url)
        https = parts.scheme == "https"
        assert parts.hostname is not None  # the config checked the URL
        ca: str | None = None
        ca_file = ""
        if https:
            try:
                path = jwks_ca_file(jwt.jwks_ca)
            except ValueError as exc:
                _failed(jwt.jwks_ca or Path("<system CA bundle>"), exc)
                return None
            ca = self._file_of(self._cas, path, read_ca_bundle)
            if ca is None:
                return None
            ca_file = str(jwt.jwks_ca or "")
        host = JwksHost(host=parts.hostname, port=parts.port or (443 if https else 80),
                        ca=ca, ca_file=ca_file)
        return RemoteJwks(url=url, host=host, cache=jwt.jwks_cache, timeout=jwt.jwks_timeout)

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
        return self._file_of(self._jwks, path, read_jwks)

    @staticmethod
    def _file_of(cache: dict[Path, str], path: Path, read: Callable[[Path], str]
                 ) -> str | None:
        """A file's text, read once (then by `check`); None while it was never readable."""
        if path not in cache:
            try:
                cache[path] = read(path)
            except ValueError as exc:
                _failed(path, exc)
                return None
        return cache[path]


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
    """One JWT provider per (issuer, JWKS file, audiences), or per (issuer, JWKS URL and
    its settings, audiences): a stable name for it."""
    source = str(jwt.jwks) if jwt.jwks_url is None else "\\0".join(
        (jwt.jwks_url, str(jwt.jwks_cache), str(jwt.jwks_timeout), str(jwt.jwks_ca)))
    seed = "\\0".join([jwt.issuer, source, *jwt.audiences]).encode()
    return "jwt_" + hashlib.sha256(seed).hexdigest()[:12]


def _failed(path: Path, exc: ValueError) -> None:
    event(log, "auth.reload_failed", level=logging.ERROR, file=str(path), error=str(exc))
    metrics.AUTH_RELOADS.labels(result="failed").inc()


def _reloaded(path: Path) -> bool:
    event(log, "auth.reloaded", file=str(path))
    metrics.AUTH_RELOADS.labels(result="applied").inc()
    return True
