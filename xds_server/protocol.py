"""Pure protocol decisions of state-of-the-world xDS, tested as tables.

Owns: how to classify a DiscoveryRequest (initial, ACK, NACK, stale) and which resources a
stream must be sent next. No I/O, no gRPC, no clock: server.py calls these and acts.
Istio's `ShouldRespond` is the model: NACK → record, don't answer with the same version;
empty nonce → answer; stale nonce → ignore; matching nonce → ACK.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping

from xds_server.cache import Resource


class RequestKind(enum.Enum):
    INITIAL = "initial"  # first request for a type on this stream (empty nonce): answer it
    ACK = "ack"  # the response awaiting an answer was applied
    NACK = "nack"  # the response awaiting an answer was rejected: error_detail says why
    UPDATE = "update"  # answered already; only the subscribed names may have changed
    STALE = "stale"  # answers a response that was superseded: ignore


def classify(response_nonce: str, has_error: bool, last_nonce: str | None,
             awaiting: bool) -> RequestKind:
    """Classify a request by its nonce and error_detail.

    `last_nonce` is the nonce of the last response sent on this stream for this type, and
    `awaiting` says whether that response still awaits its ACK/NACK. Envoy re-sends a
    request with the last nonce when its subscribed names change after it answered: that
    is an UPDATE, counted as neither ACK nor NACK.
    """
    if not response_nonce:
        return RequestKind.INITIAL
    if response_nonce != last_nonce:
        return RequestKind.STALE
    if not awaiting:
        return RequestKind.UPDATE
    return RequestKind.NACK if has_error else RequestKind.ACK


def updates_for(
    resources: Mapping[str, Resource],
    sent: Mapping[str, bytes],
    subscribed: Collection[str] | None,
) -> list[Resource] | None:
    """Resources to send, or None when the stream already has everything.

    `subscribed` None means a wildcard type (CDS, LDS): the response must carry every
    resource, and is due whenever the set of names or any digest differs from `sent`.
    Otherwise (EDS, RDS) only the subscribed resources whose digest differs from what the
    stream was sent are due, and a response carries just those.
    """
    if subscribed is None:
        if len(resources) == len(sent) and all(
            sent.get(name) == r.digest for name, r in resources.items()
        ):
            return None
        return [resources[name] for name in sorted(resources)]
    due = [
        resources[name]
        for name in sorted(subscribed)
        if name in resources and sent.get(name) != resources[name].digest
    ]
    return due or None
