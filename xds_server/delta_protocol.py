"""Pure protocol decisions of incremental (delta) xDS, tested as tables.

Owns: how to classify a DeltaDiscoveryRequest (subscription change, ACK, NACK, stale),
how a request changes a stream's subscription (names, wildcard), what a reconnecting Envoy
already has (`initial_resource_versions`), and which resources a stream must be sent or
told are removed. No I/O, no gRPC, no clock: delta_server.py calls these and acts.

A resource's version is the hex of its digest (cache.py `Resource.version`): the same
content has the same version across control-plane restarts, so a reconnecting Envoy that
already holds it is sent nothing. go-control-plane's delta server is the model for the
rules; NACKs follow state-of-the-world's (protocol.py): a rejected response is never sent
again, only a newer snapshot is.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Mapping

import immutables

from xds_server.cache import Changes, Resource

#: The name that subscribes to (or, unsubscribed, leaves) every resource of a type.
WILDCARD = "*"


class DeltaKind(enum.Enum):
    REQUEST = "request"  # no nonce: the first request, or a change of subscriptions
    ACK = "ack"  # answers the response awaiting an answer: applied
    NACK = "nack"  # answers it with error_detail: rejected
    STALE = "stale"  # answers a response that is not the one awaiting: ignore the answer


def classify(response_nonce: str, has_error: bool, awaiting_nonce: str | None) -> DeltaKind:
    """Classify a request by its nonce. `awaiting_nonce`: the nonce of this type's response
    that still awaits its ACK/NACK (None when none does). Envoy may carry subscription
    changes on an ACK too: those apply whatever the kind (the caller applies them)."""
    if not response_nonce:
        return DeltaKind.REQUEST
    if response_nonce != awaiting_nonce:
        return DeltaKind.STALE
    return DeltaKind.NACK if has_error else DeltaKind.ACK


@dataclasses.dataclass(frozen=True)
class Subscription:
    """What one stream asked for, for one type: every resource (`wildcard`) and/or the
    resources in `names`."""

    wildcard: bool = False
    names: frozenset[str] = frozenset()

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names


def subscribe(current: Subscription | None, add: Collection[str], drop: Collection[str],
              wildcard_type: bool) -> Subscription:
    """The subscription after a request that subscribes `add` and unsubscribes `drop`.

    `current` None: the stream's first request for the type. For a wildcard type (CDS,
    LDS) a first request that names nothing is a wildcard subscription (the legacy form
    Envoy uses); "*" subscribes to every resource explicitly and unsubscribing "*" ends
    it. For EDS and RDS only named resources are ever sent. A request that changes
    nothing returns `current` itself."""
    if current is not None and not add and not drop:
        return current
    wildcard = current.wildcard if current is not None else False
    names = set(current.names) if current is not None else set()
    if current is None and wildcard_type and not add:
        wildcard = True
    for name in add:
        if name == WILDCARD:
            wildcard = wildcard_type
        else:
            names.add(name)
    for name in drop:
        if name == WILDCARD:
            wildcard = False
        else:
            names.discard(name)
    return Subscription(wildcard=wildcard, names=frozenset(names))


def known_versions(initial: Mapping[str, str]) -> immutables.Map[str, bytes]:
    """What a reconnecting Envoy says it holds, as name -> digest. A version that is not a
    digest of ours (another control plane's, or garbage) maps to b"" and so never matches:
    that resource is sent again."""
    known = {}
    for name, version in initial.items():
        try:
            known[name] = bytes.fromhex(version)
        except ValueError:
            known[name] = b""
    return immutables.Map(known)


@dataclasses.dataclass(frozen=True)
class DeltaUpdate:
    """One response's content: resources to (re)send and names Envoy must drop."""

    changed: list[Resource]
    removed: list[str]


def delta_updates(resources: Mapping[str, Resource], sent: Mapping[str, bytes],
                  subscription: Subscription, first: bool = False) -> DeltaUpdate | None:
    """What a stream must be sent so that it holds exactly the subscribed part of
    `resources`, given that it holds `sent` (name -> digest); None when it does.

    Changed: subscribed resources whose digest differs from what the stream holds.
    Removed: names the stream holds that are gone from `resources` (a subscribed name
    that the stream never held is not reported: it was never there). `first`: the type
    was never answered on this stream; a wildcard subscription then gets an answer even
    when it is empty (go-control-plane's rule: Envoy's initial fetch waits for one)."""
    if subscription.wildcard:
        candidates: Collection[str] = resources.keys()
    else:
        candidates = subscription.names
    changed = [resources[name] for name in sorted(candidates)
               if name in resources and sent.get(name) != resources[name].digest]
    removed = sorted(name for name in sent if name not in resources)
    if not changed and not removed and not (first and subscription.wildcard):
        return None
    return DeltaUpdate(changed=changed, removed=removed)


def updates_from_changes(change: Changes, resources: Mapping[str, Resource],
                         sent: Mapping[str, bytes],
                         subscription: Subscription) -> DeltaUpdate | None:
    """`delta_updates`, for a stream that holds exactly the subscribed part of the previous
    snapshot, from that snapshot's `change` alone: work in proportion to what changed,
    not to the number of resources (an endpoint flip at 10,000 services)."""
    changed = [resources[name] for name in sorted(change.changed)
               if subscription.wants(name) and sent.get(name) != resources[name].digest]
    removed = sorted(name for name in change.removed if name in sent)
    if not changed and not removed:
        return None
    return DeltaUpdate(changed=changed, removed=removed)


def updates_for(names: Collection[str], resources: Mapping[str, Resource],
                sent: Mapping[str, bytes]) -> DeltaUpdate | None:
    """What a stream that holds exactly its subscribed part of `resources` needs once it
    subscribed to `names` too: those of them it does not hold as they are (in proportion
    to `names`; a name no resource has is not reported, as in `delta_updates`)."""
    changed = [resources[name] for name in sorted(names)
               if name in resources and sent.get(name) != resources[name].digest]
    return DeltaUpdate(changed=changed, removed=[]) if changed else None


def merged(first: DeltaUpdate | None, second: DeltaUpdate | None) -> DeltaUpdate | None:
    """Both updates as one response (a resource in both is sent once)."""
    if first is None or second is None:
        return first or second
    names = {r.name for r in first.changed}
    return DeltaUpdate(changed=[*first.changed, *(r for r in second.changed
                                                  if r.name not in names)],
                       removed=sorted({*first.removed, *second.removed}))


Held = immutables.Map[str, bytes]  # what a stream holds: name -> digest


def held_after(sent: Held, subscription: Subscription) -> Held:
    """What the stream still holds (as far as we must track) after its subscription
    changed: Envoy drops an unsubscribed resource itself, and resubscribing means it must
    be sent again."""
    if subscription.wildcard:
        return sent
    gone = [name for name in sent if not subscription.wants(name)]
    return _without(sent, gone)


def applied(held: Held, update: DeltaUpdate) -> Held:
    """What the stream holds once it applied `update` on top of `held`: in proportion to
    the update (a persistent map), not to what the stream holds."""
    out = _without(held, update.removed).mutate()
    for r in update.changed:
        out[r.name] = r.digest
    return out.finish()


def rejected(held: Held, acked: Mapping[str, bytes], update: DeltaUpdate) -> Held:
    """What the stream is taken to hold after it rejected `update`: for every name the
    update touched, what it last acknowledged (Envoy keeps its last good config; sending
    a resource it holds already again is harmless, missing one is not)."""
    touched = {r.name for r in update.changed} | set(update.removed)
    out = held.mutate()
    for name in touched:
        if name in acked:
            out[name] = acked[name]
        elif name in out:
            del out[name]
    return out.finish()


def _without(held: Held, names: Collection[str]) -> Held:
    if not names:
        return held
    out = held.mutate()
    for name in names:
        if name in out:
            del out[name]
    return out.finish()
