"""The pure protocol decisions of xds_server/protocol.py, as tables (Istio's ShouldRespond)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from google.protobuf import wrappers_pb2

from xds_server.cache import Resource
from xds_server.protocol import RequestKind, classify, updates_for

K = RequestKind


# --- classify -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("response_nonce", "has_error", "last_nonce", "awaiting", "expected"),
    [
        pytest.param("", False, None, False, K.INITIAL, id="first-request"),
        pytest.param("", True, None, False, K.INITIAL, id="empty-nonce-with-error-is-initial"),
        pytest.param("", False, "7", True, K.INITIAL, id="empty-nonce-while-awaiting"),
        pytest.param("", True, "7", True, K.INITIAL, id="empty-nonce-error-while-awaiting"),
        pytest.param("6", False, "7", True, K.STALE, id="stale-nonce"),
        pytest.param("6", True, "7", True, K.STALE, id="stale-nonce-with-error"),
        pytest.param("6", False, "7", False, K.STALE, id="stale-nonce-not-awaiting"),
        pytest.param("7", False, "7", True, K.ACK, id="matching-nonce-ack"),
        pytest.param("7", True, "7", True, K.NACK, id="matching-nonce-error-nack"),
        pytest.param("7", False, "7", False, K.UPDATE, id="answered-names-changed"),
        # Envoy keeps error_detail on later requests until it accepts something: a
        # subscription change after a NACK is an update, not a second NACK.
        pytest.param("7", True, "7", False, K.UPDATE, id="answered-error-kept-is-update"),
        pytest.param("3", True, None, False, K.STALE, id="unknown-nonce-with-error"),
        pytest.param("3", False, None, False, K.STALE, id="unknown-nonce"),
    ],
)
def test_classify(response_nonce: str, has_error: bool, last_nonce: str | None,
                  awaiting: bool, expected: RequestKind) -> None:
    assert classify(response_nonce, has_error, last_nonce, awaiting) is expected


# --- updates_for ----------------------------------------------------------------------

def res(name: str, value: str) -> Resource:
    """A resource whose content (and so digest) is `value`."""
    return Resource.pack(name, wrappers_pb2.StringValue(value=value))


A1, A2 = res("a", "1"), res("a", "2")
B1 = res("b", "1")
C1 = res("c", "1")


def snapshot(*resources: Resource) -> dict[str, Resource]:
    return {r.name: r for r in resources}


def sent(*resources: Resource) -> dict[str, bytes]:
    return {r.name: r.digest for r in resources}


@pytest.mark.parametrize(
    ("resources", "was_sent", "subscribed", "expected"),
    [
        # Wildcard (CDS, LDS): the whole set, whenever anything differs.
        pytest.param(snapshot(A1, B1), sent(A1, B1), None, None, id="wildcard-same"),
        pytest.param(snapshot(), sent(), None, None, id="wildcard-both-empty"),
        pytest.param(snapshot(B1, A1), sent(), None, [A1, B1], id="wildcard-first-sorted"),
        pytest.param(snapshot(C1, A2, B1), sent(A1, B1, C1), None, [A2, B1, C1],
                     id="wildcard-changed-digest-sends-all-sorted"),
        pytest.param(snapshot(A1, C1), sent(A1, B1, C1), None, [A1, C1],
                     id="wildcard-removed-sends-remaining"),
        pytest.param(snapshot(A1, B1), sent(A1), None, [A1, B1], id="wildcard-added"),
        pytest.param(snapshot(A1), sent(B1), None, [A1], id="wildcard-same-count-other-names"),
        # An empty set after resources existed must go out (empty), so Envoy deletes them.
        pytest.param(snapshot(), sent(A1, B1), None, [], id="wildcard-all-removed-empty-list"),
        # Non-wildcard (EDS, RDS): subscribed and changed only.
        pytest.param(snapshot(A1, B1), sent(), {"a"}, [A1], id="named-first-only-subscribed"),
        pytest.param(snapshot(A2, B1, C1), sent(A1, B1), {"a", "b", "c"}, [A2, C1],
                     id="named-only-changed-sorted"),
        pytest.param(snapshot(A1), sent(), {"a", "zz"}, [A1],
                     id="named-missing-from-snapshot-not-sent"),
        pytest.param(snapshot(A1), sent(), {"zz"}, None, id="named-only-missing-none"),
        pytest.param(snapshot(A1, B1), sent(A1, B1), {"a", "b"}, None, id="named-unchanged"),
        pytest.param(snapshot(A2, B1), sent(A1, B1), {"b"}, None,
                     id="named-change-outside-subscription"),
        pytest.param(snapshot(A1, B1), sent(A1, B1), set(), None, id="named-empty-subscription"),
    ],
)
def test_updates_for(resources: Mapping[str, Resource], was_sent: Mapping[str, bytes],
                     subscribed: set[str] | None, expected: list[Resource] | None) -> None:
    due = updates_for(resources, was_sent, subscribed)
    if expected is None:
        assert due is None
    else:
        assert due is not None
        assert [r.name for r in due] == [r.name for r in expected]
        assert all(got is want for got, want in zip(due, expected, strict=True))


def test_wildcard_removal_of_everything_is_a_response_not_nothing() -> None:
    """[] (send an empty response) and None (nothing due) must not be confused."""
    due = updates_for({}, sent(A1), None)
    assert due == []
    assert due is not None
