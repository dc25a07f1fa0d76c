"""Which service a request reaches: hosts (exact or `*.suffix`) and path prefixes.

Owns the one rule, Envoy's, that the activator (a held request names no service), the
access-log collector (a catch-all entry has only its Host and path), the catalog (clashes)
and the config (errors) apply alike, so that what Envoy routes and what torpor thinks it
routes never differ:

- the Host picks one host first: an exact host, else the longest `*.suffix` it ends with
  (Envoy's virtual host choice); the port, case and a trailing dot do not count;
- within that host, the longest path prefix that matches picks the service. A prefix
  other than "/" matches its own path and what lies below it ("/v1/models" matches
  "/v1/models" and "/v1/models/x", never "/v1/models-x"): Envoy's
  `path_separated_prefix`. When no prefix of the chosen host matches, nothing does:
  Envoy does not fall back to a wildcard host.

Pure: no I/O; `RouteTable` changes in proportion to one service's hosts and paths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from torpor.model import host_of

ROOT = "/"
#: The request header by which Envoy names the service of a request whose path it
#: rewrote (the activator cannot tell it from the rewritten path); a client's own is
#: dropped by Envoy before routing.
SERVICE_HEADER = "x-torpor-service"
#: The request header by which Envoy names the version its split chose (set on the chosen
#: cluster, over any value a client sent; trusted for versions of the service the
#: request's route reaches only).
VERSION_HEADER = "x-torpor-version"


@dataclasses.dataclass(frozen=True)
class Routes:
    """Where one service is reached: its hosts (the first is its main host) and paths."""

    name: str
    hosts: tuple[str, ...]
    paths: tuple[str, ...] = (ROOT,)

    def pairs(self) -> list[tuple[str, str]]:
        """Every (host key, path) it claims."""
        return [(host_key(h), p) for h in self.hosts for p in self.paths]


def host_key(host: str) -> str:
    """A host as routes are keyed: lowercased (a wildcard kept). A trailing dot is kept:
    "a.test." is another domain to Envoy, and the quarantine refuses it beside "a.test"
    (xds_server/validation.py); a request's Host loses its dot (`find`)."""
    return host.lower()


def is_wildcard(host: str) -> bool:
    return host.startswith("*.")


def path_matches(prefix: str, path: str) -> bool:
    """Envoy's path_separated_prefix (and plain "/" for the root)."""
    if prefix == ROOT:
        return path.startswith(ROOT)
    return path == prefix or path.startswith(prefix + "/") or path.startswith(prefix + "?")


class RouteTable:
    """Every service's (host, path) pairs, and the lookup of a request's service."""

    def __init__(self, services: Iterable[Routes] = ()) -> None:
        # host key -> [(path, service)], longest path first
        self._by_host: dict[str, list[tuple[str, str]]] = {}
        self._routes: dict[str, Routes] = {}
        for routes in services:
            self.put(routes)

    def put(self, routes: Routes) -> None:
        """Add or replace one service's routes (its clashes are the caller's to check)."""
        self.remove(routes.name)
        self._routes[routes.name] = routes
        for host, path in routes.pairs():
            entries = self._by_host.setdefault(host, [])
            entries.append((path, routes.name))
            entries.sort(key=lambda e: (-len(e[0]), e[0], e[1]))

    def remove(self, name: str) -> None:
        old = self._routes.pop(name, None)
        if old is None:
            return
        for host, path in old.pairs():
            entries = self._by_host.get(host, [])
            entries[:] = [e for e in entries if e != (path, name)]
            if not entries:
                self._by_host.pop(host, None)

    def clashes(self, routes: Routes) -> list[tuple[str, str, str]]:
        """What another service already claims of `routes`: (host, path, that service)."""
        found = []
        for host, path in routes.pairs():
            for taken, owner in self._by_host.get(host, []):
                if taken == path and owner != routes.name:
                    found.append((host, path, owner))
        return found


    def find(self, authority: str, path: str = ROOT) -> str | None:
        """The service a request with this Host (or :authority) and path reaches."""
        entries = self._host_entries(host_of(authority))
        for prefix, name in entries:
            if path_matches(prefix, path):
                return name
        return None

    def _host_entries(self, host: str) -> list[tuple[str, str]]:
        exact = self._by_host.get(host)
        if exact is not None:
            return exact
        # The longest `*.suffix` the host ends with (the wildcard matches one label or more).
        labels = host.split(".")
        for i in range(1, len(labels)):
            found = self._by_host.get("*." + ".".join(labels[i:]))
            if found is not None:
                return found
        return []

    def shares_host(self, name: str) -> bool:
        """True when another service is reached under one of `name`'s hosts."""
        routes = self._routes.get(name)
        if routes is None:
            return False
        return any(owner != name for host in {host_key(h) for h in routes.hosts}
                   for _, owner in self._by_host.get(host, []))


def describe_clash(host: str, path: str) -> str:
    """"host 'a.test'" for the root path, "host 'a.test' path '/v1'" otherwise."""
    return f"host {host!r}" if path == ROOT else f"host {host!r} path {path!r}"
