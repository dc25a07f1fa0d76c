"""Per-service isolation: a service Envoy would refuse (or did refuse) is left out of the
published config, so every other service keeps routing.

Owns: which services are quarantined and why, what is published for them instead, and
whom to blame when Envoy rejects (NACKs) a config. Builds nothing itself (the
ResourceBuilder does) and speaks no xDS (server.py); checks come from validation.py.

Why here and not in Envoy's hands: Envoy rejects a response as a whole. One bad virtual
host made it reject the RouteConfiguration, and with it every service's routes
(measured). So each service's resources are checked before they are published
(validation.py), and a rejection Envoy still sends is pinned on the service(s) behind it:

- Envoy's `error_detail` usually names the resource: a cluster (= service name), a virtual
  host (= service name) or a domain (= a service's host). The named services that changed
  since the config every Envoy last applied are blamed; else every named one; else every
  service whose part of that resource type changed (CDS: its cluster, EDS: its endpoints,
  RDS: its host). A rejection of the listener, or one nothing can explain, blames nobody:
  it stays a control-plane problem (`unresolved`) that readiness reports.
- A quarantined service is published with its last good shape when it had one (what
  every Envoy applied last: e.g. the host before a bad edit, its old endpoints), so a bad
  change does not take a working service down; a service that never had a good shape
  is left out (its host then reaches the catch-all, i.e. the activator).
- It leaves quarantine by itself when the rejected part changes (a config or annotation
  fix, new endpoints) and the new shape passes the checks; a rejected shape is never sent
  again, so there is no resend loop. A restart forgets Envoy's verdicts (the checks run
  again; a shape only Envoy refuses is rejected once more, then quarantined again).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import immutables

from torpor import metrics
from torpor.logs import event
from xds_server import types, validation
from xds_server.cache import Desired, Resource, ResourceMap, Snapshot
from xds_server.resources import (
    CATCH_ALL_VHOST,
    GatewaySettings,
    ResourceBuilder,
    RoutedService,
    pausing_gc,
    route_key,
    service_domains,
)
from xds_server.server import Rejection

log = logging.getLogger("torpor.xds")

#: Which fields of a RoutedService shape each resource type (what a rejection of that type
#: can be blamed on, and what must change to leave quarantine).
PARTS: Mapping[str, tuple[str, ...]] = {
    "cds": ("http2", "max_concurrent"), "eds": ("endpoints",),
    "rds": ("host", "hosts", "paths", "rewrite", "retry_non_idempotent", "rate_limit",
            "route_timeout")}
_TOKEN = re.compile(r"[A-Za-z0-9_.*:\-]+")


@dataclasses.dataclass(frozen=True)
class Problem:
    """Why a service is quarantined: `source` "validator" (before publishing) or "envoy"
    (a NACK); `parts`: the resource types at fault (keys of PARTS); `bad`: the rejected
    shape."""

    message: str
    source: str
    parts: frozenset[str]
    bad: RoutedService
    # A NACK that named nobody, pinned on several services that changed together: one of
    # the `group` is at fault, maybe not this one. `applied` lets them back half a group
    # at a time until each one left is alone at fault (confirmed).
    confirmed: bool = True
    group: int = 0

    def still_applies(self, service: RoutedService) -> bool:
        """True while `service` has the rejected values in every part at fault."""
        return all(getattr(service, f) == getattr(self.bad, f)
                   for part in self.parts for f in PARTS[part])


class QuarantineBuilder(ResourceBuilder):
    """A ResourceBuilder that publishes only the services Envoy will accept.

    `update(services)` checks each changed service (cached by its resources' digests;
    by shape where the builder rendered them, `_passes_by_shape`, else walked),
    leaves the quarantined ones out or at their last good shape, and remembers what it
    admitted so that a NACK can be pinned on a service (`rejected`) and a config every
    Envoy applied becomes the last good one (`applied`). Work in proportion to the
    services that changed and those quarantined: an endpoint flip at 10k services checks
    one service and claims its domains in an index, not 20k domains again."""

    def __init__(self, settings: GatewaySettings) -> None:
        super().__init__(settings)
        self._checked: dict[str, tuple[tuple[Any, ...], dict[str, list[str]]]] = {}
        self._nacked: dict[str, Problem] = {}  # Envoy's verdicts, until the part changes
        self._quarantined: dict[str, Problem] = {}  # as of the last build
        self._wanted: dict[str, RoutedService] = {}  # every service as the table wants it
        # What every Envoy applied last, and what is published now (persistent maps: the
        # one becomes the other in O(1) when a build is applied).
        self._good: Mapping[str, RoutedService] = immutables.Map()
        self._admitted: immutables.Map[str, RoutedService] = immutables.Map()
        self._built: Mapping[str, ResourceMap] | None = None
        self._built_admitted: Mapping[str, RoutedService] = immutables.Map()
        self._domains = validation.DomainIndex(reserved=[(CATCH_ALL_VHOST, ["*"])])
        self.unresolved: str | None = None  # a rejection no service could be blamed for
        self._groups = 0  # suspects blamed together share a group number

    # --- what status, metrics and readiness read ----------------------------------------

    def problem(self, name: str) -> str | None:
        """Why `name` is quarantined now, in the validator's or Envoy's words; None if not."""
        found = self._quarantined.get(name)
        return None if found is None else found.message

    def left_out(self, name: str) -> str | None:
        """The problem of a quarantined service that is not published at all (no last
        good shape to fall back to): Envoy does not route it. None otherwise."""
        found = self._quarantined.get(name)
        if found is None or name in self._admitted:
            return None
        return found.message

    def quarantined(self) -> dict[str, str]:
        return {name: p.message for name, p in self._quarantined.items()}

    # --- building -----------------------------------------------------------------------

    @pausing_gc
    def update(self, services: Mapping[str, RoutedService | None]) -> None:
        """Admit these services (None: gone) and re-decide the quarantined and suspected
        ones (a domain freed, a verdict given or lifted); build what is admitted."""
        for name, svc in services.items():
            if svc is None:
                self._wanted.pop(name, None)
                self._checked.pop(name, None)
                self._nacked.pop(name, None)
            else:
                self._wanted[name] = svc
        candidates = set(services) | set(self._quarantined) | set(self._nacked)
        decided, quarantined = self._admit(candidates)
        self._note_changes(candidates, quarantined)
        admitted = self._admitted.mutate()
        for name, shape in decided.items():
            if shape is not None:
                admitted[name] = shape
            elif name in admitted:
                del admitted[name]
        self._admitted = admitted.finish()
        super().update(decided)

    def desired(self) -> Desired:
        built = super().desired()
        self._built, self._built_admitted = built.resources, self._admitted
        return built

    def _admit(self, names: Iterable[str]
               ) -> tuple[dict[str, RoutedService | None], dict[str, Problem]]:
        """What to publish of each of `names` (its current or last good shape; None:
        nothing) and the quarantined ones among them with their problem."""
        quarantined: dict[str, Problem] = {}
        chosen: dict[str, RoutedService | None] = {}
        for name in sorted(names):
            svc = self._wanted.get(name)
            self._domains.release(name)
            if svc is None:
                chosen[name] = None
                continue
            nacked = self._nacked.get(name)
            if nacked is not None and not nacked.still_applies(svc):
                del self._nacked[name]  # the rejected part changed: try it again
                nacked = None
            problem = nacked or self._validate(svc)
            if problem is None:
                chosen[name] = svc
                continue
            quarantined[name] = problem
            chosen[name] = self._fallback(svc, problem)
        # Domains: services on their last good host claim theirs first, so that a clash
        # is blamed on the newcomer, not on the service that was there before.
        def settled(name: str) -> bool:
            good, shape = self._good.get(name), chosen[name]
            return good is not None and shape is not None and good.host == shape.host

        for name in sorted(chosen, key=lambda n: (not settled(n), n)):
            shape = chosen[name]
            if shape is None:
                continue
            clashes = self._domains.claim(name, self._domains_of(shape), shape.prefixes(),
                                          owner=shape.version_of)
            if not clashes:
                continue
            original = self._wanted[name]
            problem = Problem("; ".join(clashes), "validator", frozenset({"rds"}), original)
            quarantined.setdefault(name, problem)
            fallback = self._fallback(original, problem)
            chosen[name] = fallback if fallback is not None and not self._domains.claim(
                name, self._domains_of(fallback), fallback.prefixes(),
                owner=fallback.version_of) else None
        return chosen, quarantined

    def _domains_of(self, svc: RoutedService) -> list[str]:
        return service_domains(svc)

    def _fallback(self, svc: RoutedService, problem: Problem) -> RoutedService | None:
        """`svc` with its last good values in the parts at fault, if that passes."""
        good = self._good.get(svc.name)
        if good is None:
            return None
        fields = {f: getattr(good, f) for part in problem.parts for f in PARTS[part]}
        candidate = dataclasses.replace(svc, **fields)
        if problem.still_applies(candidate) or self._validate(candidate) is not None:
            return None
        nacked = self._nacked.get(svc.name)
        if nacked is not None and nacked is not problem and nacked.still_applies(candidate):
            return None
        return candidate

    def _validate(self, svc: RoutedService) -> Problem | None:
        """The validator's verdict on one service's cluster, endpoints and virtual host
        (a service found by Host has none of its own; cached by their digests: a
        10k-service rebuild checks only what changed)."""
        cluster = self._cluster(svc)
        if self._by_host(svc):  # its endpoints are in its cluster (STATIC): checked there
            endpoints: Resource | None = None
            key: tuple[object, ...] = (cluster.digest, route_key(svc))
        else:
            endpoints = self._load_assignment(svc.name, svc.endpoints)
            key = (cluster.digest, endpoints.digest, route_key(svc))
        cached = self._checked.get(svc.name)
        if cached is None or cached[0] != key:
            found = self._host_routed_problems(svc, cluster) if endpoints is None else {
                "cds": [] if self._passes_by_shape("cds", svc, cluster.body.value) else
                validation.check_message(cluster.body, f"cluster {svc.name}"),
                "eds": self._endpoint_problems(svc, endpoints),
                "rds": [] if self._passes_by_shape("rds", svc, self._vhost_bytes(svc)) else
                validation.check_message(self._vhost(svc), f"virtual host {svc.name}"),
            }
            cached = self._checked[svc.name] = (key, {k: v for k, v in found.items() if v})
        problems = cached[1]
        if not problems:
            return None
        text = "; ".join(p for found in problems.values() for p in found)
        return Problem(text, "validator", frozenset(problems), svc)

    def _host_routed_problems(self, svc: RoutedService, cluster: Resource
                              ) -> dict[str, list[str]]:
        """What is wrong with a service found by Host: its cluster, and the addresses of
        the endpoints in it (one check by shape covers both). It has no virtual host of
        its own, and its host is a valid domain by construction (`host_routed`)."""
        if self._passes_by_shape("cds", svc, cluster.body.value, addresses=True):
            return {}
        return {"cds": validation.check_message(cluster.body, f"cluster {svc.name}"),
                "eds": validation.check_endpoint_addresses(cluster.body, svc.name)}

    def _endpoint_problems(self, svc: RoutedService, endpoints: Resource) -> list[str]:
        """What is wrong with `svc`'s endpoints in its ClusterLoadAssignment."""
        if self._passes_by_shape("eds", svc, endpoints.body.value):
            return []
        return (validation.check_message(endpoints.body, f"endpoints of {svc.name}")
                or validation.check_endpoint_addresses(endpoints.body, svc.name))

    def _passes_by_shape(self, part: str, svc: RoutedService, serialized: bytes,
                         addresses: bool = False) -> bool:
        """True when `svc`'s resource of `part` (its `serialized` bytes) is its shape's
        with its own names and passes every check (validation.Shape; for endpoints, and
        with `addresses` for a cluster that holds them, the address rule too): the same
        verdict as walking it, at a fraction of the cost. False: walk it (for the words)."""
        shape, values = self.shape(part, svc)
        return (shape is not None and shape.clean
                and shape.render(values) == serialized and shape.passes(values)
                and (not (addresses or part == "eds") or shape.addresses_pass(values)))

    def _note_changes(self, decided: Iterable[str], quarantined: dict[str, Problem]) -> None:
        """Log and count each of the `decided` services entering or leaving quarantine,
        once."""
        for name, problem in quarantined.items():
            before = self._quarantined.get(name)
            if before is None or before.message != problem.message:
                event(log, "service.quarantined", level=logging.ERROR, service=name,
                      source=problem.source, problem=problem.message,
                      published="last good config" if name in self._good else "nothing")
                metrics.SERVICE_QUARANTINED.labels(service=name).set(1)
        for name in decided:
            if name in self._quarantined and name not in quarantined:
                del self._quarantined[name]
                metrics.SERVICE_QUARANTINED.labels(service=name).set(0)
                if name in self._wanted:
                    event(log, "service.released", service=name)
        self._quarantined.update(quarantined)

    # --- what Envoy said ----------------------------------------------------------------

    def applied(self, snapshot: Snapshot) -> bool:
        """Every connected Envoy applied `snapshot`: if it is the last build, its services
        are the last good shapes (what a quarantined service falls back to). True when
        suspects are let back in (the caller pushes again): see `_narrow`."""
        if self._built is None or not snapshot.same_content(self._built):
            return False
        self._good = self._built_admitted
        self.unresolved = None
        return self._narrow()

    def _narrow(self) -> bool:
        """Let half of the smallest group of unconfirmed suspects back in. Envoy then
        accepts them (innocent: they become good) or rejects them (a NACK with only them
        changed: a smaller group, or one service confirmed). A bisection driven by Envoy's
        verdicts: about log2(n) pushes find one bad service among n."""
        groups: dict[int, list[str]] = {}
        for name, problem in self._nacked.items():
            if not problem.confirmed:
                groups.setdefault(problem.group, []).append(name)
        if not groups:
            return False
        group = min(groups, key=lambda g: (len(groups[g]), -g))
        names = sorted(groups[group])
        for name in names[:max(1, len(names) // 2)]:
            del self._nacked[name]
        event(log, "xds.nack_narrowing", level=logging.INFO,
              retried=names[:max(1, len(names) // 2)], still_suspected=len(names) // 2)
        return True

    def rejected(self, rejection: Rejection, snapshot: Snapshot | None) -> bool:
        """Envoy rejected `rejection.version`: quarantine the services behind it. True when
        a service was newly quarantined (the caller republishes without it). A rejection
        of an older snapshot than the current one is ignored: the current one is judged on
        its own."""
        if snapshot is None or rejection.version != snapshot.version:
            return False
        part = types.short(rejection.type_url)
        said = envoy_words(rejection.error)
        suspects, named = blame(said, part, list(self._admitted.values()), self._good)
        fresh = [s for s in suspects if s.name not in self._nacked]
        if not fresh:
            if not suspects:
                self.unresolved = (f"Envoy {rejection.node} rejected {part} "
                                   f"v{rejection.version}: {said}")
                event(log, "xds.nack_unresolved", level=logging.ERROR, node=rejection.node,
                      type=part, error=said)
            return False
        confirmed = named or len(fresh) == 1
        self._groups += 1
        what = _PART_NAMES[part]
        message = (f"Envoy rejected its {what}: {said}" if confirmed else
                   f"Envoy rejected the {what} of one of {len(fresh)} services changed "
                   f"together (narrowing down): {said}")
        for svc in fresh:
            self._nacked[svc.name] = Problem(
                message, "envoy", frozenset({part}) if part in PARTS else frozenset(PARTS),
                svc, confirmed=confirmed, group=self._groups)
        return True


_PART_NAMES = {"cds": "cluster", "eds": "endpoints", "rds": "route", "lds": "listener"}
#: Where Envoy's text dump of a rejected resource starts (protobuf's DebugString marker).
_DUMP_MARKER = "goo.gle/debug"
#: Envoy's words shown in status at most (its error_detail may be kilobytes).
MAX_WORDS = 400


def envoy_words(error: str) -> str:
    """Envoy's error without the dump of the rejected resource it may carry (measured: a
    route table failing Envoy's proto validation came back as 4 KB of the route table's
    text, truncated, naming every service in it and no reason), at most MAX_WORDS."""
    cut = error.find(_DUMP_MARKER)
    words = (error if cut < 0 else error[:cut]).strip().rstrip(":").strip()
    if cut >= 0:
        words = (f"{words} " if words else "") + \
            "(Envoy's message is a dump of the rejected resource, without a reason)"
    return words if len(words) <= MAX_WORDS else words[:MAX_WORDS - 3] + "..."


def blame(error: str, part: str, admitted: list[RoutedService],
          good: Mapping[str, RoutedService]) -> tuple[list[RoutedService], bool]:
    """The services a rejection of resource type `part` with `error` is pinned on, and
    whether Envoy's words named them (pure).

    Named (their name, their host as a domain, or for EDS an endpoint address appears in
    `error`) and changed since `good`; else named; else changed. Nobody for the listener
    (shared by all)."""
    if part not in PARTS:
        return [], False
    fields = PARTS[part]
    changed = [s for s in admitted if s.name not in good
               or any(getattr(s, f) != getattr(good[s.name], f) for f in fields)]
    tokens = {t.rstrip(".:,;'\"").removesuffix(":*") for t in _TOKEN.findall(error)}
    tokens |= {t.rstrip(".:") for t in tokens}
    named = [s for s in admitted if s.name in tokens or s.host in tokens
             or (part == "eds" and any(e.host in tokens for e in s.endpoints))]
    if named:
        return [s for s in named if s in changed] or named, True
    return changed, False
