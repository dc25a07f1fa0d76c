"""The pure decisions of delta xDS (xds_server/delta_protocol.py), as tables."""

from __future__ import annotations

import random

import immutables
import pytest
from google.protobuf import wrappers_pb2

from xds_server.cache import Resource, changes
from xds_server.delta_protocol import (
    DeltaKind,
    DeltaUpdate,
    Subscription,
    applied,
    classify,
    delta_updates,
    held_after,
    known_versions,
    rejected,
    subscribe,
    updates_from_changes,
)

K = DeltaKind


def res(name: str, value: str = "v1") -> Resource:
    return Resource.pack(name, wrappers_pb2.StringValue(value=value))


def digests(*resources: Resource) -> immutables.Map[str, bytes]:
    return immutables.Map({r.name: r.digest for r in resources})


# --- classify -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("nonce", "has_error", "awaiting_nonce", "expected"),
    [
        pytest.param("", False, None, K.REQUEST, id="first-request"),
        pytest.param("", False, "7", K.REQUEST, id="subscription-change-while-awaiting"),
        pytest.param("", True, "7", K.REQUEST, id="no-nonce-error-is-a-request"),
        pytest.param("7", False, "7", K.ACK, id="ack"),
        pytest.param("7", True, "7", K.NACK, id="nack"),
        pytest.param("6", False, "7", K.STALE, id="older-nonce"),
        pytest.param("6", True, "7", K.STALE, id="older-nonce-with-error"),
        pytest.param("7", False, None, K.STALE, id="answered-already"),
        pytest.param("7", True, None, K.STALE, id="answered-already-with-error"),
    ],
)
def test_classify(nonce: str, has_error: bool, awaiting_nonce: str | None,
                  expected: DeltaKind) -> None:
    assert classify(nonce, has_error, awaiting_nonce) is expected


# --- subscriptions --------------------------------------------------------------------

W = Subscription(wildcard=True)


def names(*n: str, wildcard: bool = False) -> Subscription:
    return Subscription(wildcard=wildcard, names=frozenset(n))


@pytest.mark.parametrize(
    ("current", "add", "drop", "wildcard_type", "expected"),
    [
        pytest.param(None, [], [], True, W, id="cds-first-empty-is-wildcard"),
        pytest.param(None, ["*"], [], True, W, id="cds-explicit-wildcard"),
        pytest.param(None, ["a"], [], True, names("a"), id="cds-first-named-is-not-wildcard"),
        pytest.param(None, ["*", "a"], [], True, names("a", wildcard=True),
                     id="wildcard-and-names"),
        pytest.param(None, [], [], False, names(), id="eds-first-empty-is-nothing"),
        pytest.param(None, ["*"], [], False, names(), id="eds-star-is-not-wildcard"),
        pytest.param(None, ["a", "b"], [], False, names("a", "b"), id="eds-names"),
        pytest.param(names("a", "b"), ["c"], ["a"], False, names("b", "c"),
                     id="eds-subscribe-and-unsubscribe"),
        pytest.param(W, [], [], True, W, id="later-empty-request-keeps-wildcard"),
        pytest.param(W, [], ["*"], True, names(), id="unsubscribe-star-ends-wildcard"),
        pytest.param(names("a"), [], [], True, names("a"),
                     id="later-empty-request-is-not-wildcard"),
        pytest.param(names("a"), [], ["zzz"], False, names("a"), id="unknown-unsubscribe"),
    ],
)
def test_subscribe(current: Subscription | None, add: list[str], drop: list[str],
                   wildcard_type: bool, expected: Subscription) -> None:
    assert subscribe(current, add, drop, wildcard_type) == expected


def test_known_versions_are_digests_and_foreign_ones_never_match() -> None:
    a = res("a")
    assert dict(known_versions({"a": a.version, "b": "v17", "c": ""})) == {
        "a": a.digest, "b": b"", "c": b""}


# --- what to send -----------------------------------------------------------------------

A, B, C = res("a"), res("b"), res("c")
A2 = res("a", "v2")


@pytest.mark.parametrize(
    ("resources", "sent", "subscription", "first", "changed", "removed"),
    [
        pytest.param([A, B], {}, W, True, ["a", "b"], [], id="wildcard-initial"),
        pytest.param([A, B], digests(A, B), W, False, None, None, id="wildcard-up-to-date"),
        pytest.param([A2, B], digests(A, B), W, False, ["a"], [], id="one-changed"),
        pytest.param([A, B, C], digests(A, B), W, False, ["c"], [], id="one-added"),
        pytest.param([A], digests(A, B), W, False, [], ["b"], id="one-removed"),
        pytest.param([A2, C], digests(A, B), W, False, ["a", "c"], ["b"],
                     id="changed-added-removed"),
        pytest.param([], {}, W, True, [], [], id="empty-wildcard-first-answered"),
        pytest.param([], {}, W, False, None, None, id="empty-wildcard-later-silent"),
        pytest.param([A, B, C], {}, names("a", "c"), True, ["a", "c"], [],
                     id="named-only-subscribed"),
        pytest.param([A, B], {}, names("a", "x"), True, ["a"], [], id="named-missing-skipped"),
        pytest.param([], {}, names("a"), True, None, None, id="named-nothing-exists"),
        pytest.param([B], digests(A), names("a", "b"), False, ["b"], ["a"],
                     id="named-removed"),
        pytest.param([A2, B], digests(A, B), names("b"), False, None, None,
                     id="unsubscribed-change-not-sent"),
        # Reconnect: Envoy holds A and B (initial_resource_versions); only A changed.
        pytest.param([A2, B], digests(A, B), W, True, ["a"], [], id="reconnect-sends-diff"),
        pytest.param([A, B], {"a": b"", "b": B.digest}, W, True, ["a"], [],
                     id="reconnect-foreign-version-resent"),
    ],
)
def test_delta_updates(resources: list[Resource], sent: dict[str, bytes],
                       subscription: Subscription, first: bool, changed: list[str] | None,
                       removed: list[str] | None) -> None:
    update = delta_updates({r.name: r for r in resources}, sent, subscription, first)
    if changed is None:
        assert update is None
    else:
        assert update is not None
        assert [r.name for r in update.changed] == changed
        assert update.removed == removed


def test_held_after_drops_what_was_unsubscribed() -> None:
    held = digests(A, B)
    assert held_after(held, names("b")) == digests(B)
    assert held_after(held, W) == held


def test_applied_then_rejected_goes_back_to_what_was_acknowledged() -> None:
    acked = digests(A, B)
    update = DeltaUpdate(changed=[A2, C], removed=["b"])
    after = applied(acked, update)
    assert after == digests(A2, C)
    # Rejected: every touched name back at its acknowledged digest; a new one is not held.
    assert rejected(after, acked, update) == acked
    # An untouched name keeps what it holds.
    assert rejected(after.set("d", b"d"), acked, update) == acked.set("d", b"d")


@pytest.mark.parametrize("seed", range(40))
def test_updates_from_changes_equal_a_full_comparison(seed: int) -> None:
    """For a stream that held exactly the previous snapshot's subscribed part, the
    snapshot's changes alone give what comparing every resource gives."""
    rng = random.Random(seed)
    universe = [f"r{i}" for i in range(12)]

    def snapshot() -> dict[str, Resource]:
        return {n: res(n, f"v{rng.randrange(3)}") for n in universe if rng.random() < 0.7}

    old, new = snapshot(), snapshot()
    subscription = W if rng.random() < 0.5 else names(*rng.sample(universe, 6))
    held = {n: r.digest for n, r in old.items() if subscription.wants(n)}
    full = delta_updates(new, held, subscription)
    fast = updates_from_changes(changes(old, new), new, held, subscription)
    assert (fast and ([r.name for r in fast.changed], fast.removed)) == \
        (full and ([r.name for r in full.changed], full.removed))
