"""The CLI's side of the admin API: synchronous gRPC calls and the `torpor status` table.

Owns: calling protos/admin.proto's Admin service, turning its messages into the
`status --json` dicts (exactly `ServiceStatus.to_json()`), turning gRPC failures into
AdminError with a message a user can act on, and formatting the human-readable table.
Must not know how the server implements anything (that is xds_server/admin_api.py), and
must not print: the CLI decides what goes to stdout and stderr.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from protos import admin_pb2, admin_pb2_grpc
from torpor.credentials import AdminTarget
from torpor.errors import TorporError
from torpor.model import (
    Endpoint,
    ServiceState,
    ServiceStatus,
    TrafficChange,
    Transition,
    VersionStatus,
)
from torpor.wording import for_people

#: Trailing-metadata key the server sets to the torpor error class behind a failed call.
#: Must equal xds_server.admin_api.ERROR_KIND_KEY (a test checks it); torpor does not
#: import the server package.
ERROR_KIND_KEY = "torpor-error"

#: How many recent transitions the table shows under each service.
TABLE_HISTORY = 3

#: Where to call: an address ("host:port", no token) or an AdminTarget (address and where
#: its token is; torpor.credentials.admin_target(config) finds it through the config).
Target = str | AdminTarget

# The admin API is local or cluster-internal: never route it through an HTTP proxy that
# the environment may configure for other traffic.
_CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)


class AdminError(TorporError):
    """An admin API call failed. `code` is the gRPC status code name (None if no call was
    made), `kind` the torpor error class the server reported (None if it reported none)."""

    def __init__(self, message: str, code: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind


def list_statuses(address: Target, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every service's status dict, sorted by name."""
    return list_services(address, timeout)[0]


def list_services(address: Target,
                  timeout: float = 5.0) -> tuple[list[dict[str, Any]], list[str]]:
    """Every service's status dict, sorted by name, and the discovery problems."""
    response = _invoke(address, "ListServices", admin_pb2.ListServicesRequest(), timeout, None)
    return [status_from_message(m) for m in response.services], list(response.problems)


def get_status(address: Target, name: str, timeout: float = 5.0) -> dict[str, Any]:
    """One service's status dict."""
    request = admin_pb2.GetServiceRequest(name=name)
    return status_from_message(_invoke(address, "GetService", request, timeout, name))


def hibernate(address: Target, name: str, timeout: float = 120.0) -> dict[str, Any]:
    """Put `name` to sleep now; returns its new status dict. Hibernation waits for every
    Envoy to acknowledge the flip before scaling down, hence the longer default timeout."""
    request = admin_pb2.HibernateRequest(name=name)
    return status_from_message(_invoke(address, "Hibernate", request, timeout, name))


def wake(address: Target, name: str, timeout: float = 300.0) -> dict[str, Any]:
    """Wake `name` now; returns its new status dict. A model can take minutes to load,
    hence the long default timeout (pass the config's activator.wake_timeout plus margin)."""
    request = admin_pb2.WakeRequest(name=name)
    return status_from_message(_invoke(address, "Wake", request, timeout, name))


def wait_routed(address: Target, name: str, timeout: float = 30.0) -> dict[str, Any]:
    """Return once every Envoy of the control plane at `address` routes `name` to its
    replicas; its status dict. Raises AdminError when that could not be confirmed."""
    request = admin_pb2.WaitRoutedRequest(name=name)
    return status_from_message(_invoke(address, "WaitRouted", request, timeout, name))


def report(address: Target, since: float | None = None, timeout: float = 30.0) -> Any:
    """The savings report, an admin_pb2.ReportResponse (torpor/report.py reads it); `since`:
    only the last that many seconds."""
    request = admin_pb2.ReportRequest(since_seconds=since)
    return _invoke(address, "Report", request, timeout, None)


def set_traffic(address: Target, name: str, weights: Mapping[str, int],
                timeout: float = 60.0) -> dict[str, Any]:
    """A new split of `name`'s versions, pushed; the TrafficChange as a dict."""
    request = admin_pb2.SetTrafficRequest(name=name)
    request.weights.update(weights)
    return _traffic(_invoke(address, "SetTraffic", request, timeout, name))


def promote(address: Target, name: str, version: str, timeout: float = 60.0
            ) -> dict[str, Any]:
    return _traffic(_invoke(address, "Promote",
                            admin_pb2.PromoteRequest(name=name, version=version), timeout, name))


def rollback(address: Target, name: str, timeout: float = 60.0) -> dict[str, Any]:
    return _traffic(_invoke(address, "Rollback", admin_pb2.RollbackRequest(name=name),
                            timeout, name))


def _traffic(message: Any) -> dict[str, Any]:
    return TrafficChange(str(message.name), dict(message.weights),
                         dict(message.previous) or None, float(message.push_seconds),
                         bool(message.applied)).to_json()


def register(address: Target, name: str, host: str, spec: Mapping[str, Any],
             timeout: float = 60.0) -> dict[str, Any]:
    """Register a service (`spec`: the rest of its `services:` entry); returns its status
    dict once the control plane has it in its table."""
    request = admin_pb2.RegisterServiceRequest(name=name, host=host,
                                               spec_json=json.dumps(dict(spec)))
    return status_from_message(_invoke(address, "RegisterService", request, timeout, name))


def unregister(address: Target, name: str, timeout: float = 60.0) -> None:
    """Remove a registered service (its route, then its replicas)."""
    request = admin_pb2.UnregisterServiceRequest(name=name)
    _invoke(address, "UnregisterService", request, timeout, name)


def status_from_message(message: Any) -> dict[str, Any]:
    """admin_pb2.ServiceStatus → the dict of `ServiceStatus.to_json()`."""
    try:
        status = ServiceStatus(
            name=message.name,
            host=message.host,
            state=ServiceState(message.state),
            replicas=int(message.replicas),
            desired_replicas=int(message.desired_replicas),
            recorded_replicas=int(message.recorded_replicas),
            ready_endpoints=tuple(parse_endpoint(text) for text in message.ready_endpoints),
            last_call=float(message.last_call) if message.HasField("last_call") else None,
            created_at=float(message.created_at),
            updated_at=float(message.updated_at),
            history=tuple(
                Transition(
                    at=float(t.at),
                    from_state=ServiceState(t.from_state) if t.from_state else None,
                    to_state=ServiceState(t.to_state),
                    reason=t.reason,
                )
                for t in message.history
            ),
            keep_alive=float(message.keep_alive) if message.HasField("keep_alive") else None,
            next_call=float(message.next_call) if message.HasField("next_call") else None,
            problem=str(message.problem) if message.HasField("problem") else None,
            replica_problem=(str(message.replica_problem)
                             if message.HasField("replica_problem") else None),
            source=str(message.source) if message.HasField("source") else None,
            group=str(message.group) if message.HasField("group") else None,
            wake_timeout=(float(message.wake_timeout)
                          if message.HasField("wake_timeout") else None),
            max_held=int(message.max_held) if message.HasField("max_held") else None,
            activation_replicas=(int(message.activation_replicas)
                                 if message.HasField("activation_replicas") else None),
            min_awake=float(message.min_awake) if message.HasField("min_awake") else None,
            hosts=tuple(message.hosts), paths=tuple(message.paths),
            versions=tuple(VersionStatus(v.name, int(v.weight), ServiceState(v.state),
                                         int(v.replicas), int(v.recorded_replicas))
                           for v in message.versions),
            rewrite=str(message.rewrite) if message.HasField("rewrite") else None,
        )
    except ValueError as exc:
        raise AdminError(
            f"the admin API returned a status this torpor cannot read ({exc}); "
            "are the CLI and the control plane the same version?"
        ) from exc
    return status.to_json()


def parse_endpoint(text: str) -> Endpoint:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad endpoint {text!r}, expected host:port")
    return Endpoint(host=host.strip("[]"), port=int(port))


def _invoke(target: Target, method: str, request: Any, timeout: float, name: str | None) -> Any:
    if isinstance(target, str):
        target = AdminTarget(target)
    address = target.address
    try:
        with _channel(target) as channel:
            call = getattr(admin_pb2_grpc.AdminStub(channel), method)
            return call(request, timeout=timeout, metadata=target.metadata())
    except grpc.RpcError as exc:
        error = _error_for(exc, address, name, timeout)
        if error.code == "UNAUTHENTICATED":
            error = AdminError(f"{error} (the token is looked for in: {target.where()})",
                               code=error.code, kind=error.kind)
        raise error from exc


def _channel(target: AdminTarget) -> grpc.Channel:
    """Plaintext, or TLS checked against the target's CA (control_plane.admin_tls)."""
    if target.ca is None:
        return grpc.insecure_channel(target.address, options=_CHANNEL_OPTIONS)
    try:
        ca = target.ca.read_bytes()
    except OSError as exc:
        raise AdminError(f"cannot read control_plane.admin_tls.ca {target.ca}: "
                         f"{exc.strerror}") from exc
    return grpc.secure_channel(target.address, grpc.ssl_channel_credentials(ca),
                               options=_CHANNEL_OPTIONS)


def _cannot_reach(address: str, details: str = "") -> str:
    why = f": {details}" if details else ""
    return (
        f"cannot reach the torpor admin API at {address}{why} "
        "(is torpor running? check control_plane.admin_api in the config)"
    )


def _error_for(exc: Any, address: str, name: str | None, timeout: float) -> AdminError:
    """A failed call → AdminError whose message says what to do about it."""
    code = exc.code()
    details = str(exc.details() or "")
    metadata = {str(key): str(value) for key, value in (exc.trailing_metadata() or ())}
    kind = metadata.get(ERROR_KIND_KEY)
    code_name = str(code.name)

    def error(message: str) -> AdminError:
        return AdminError(message, code=code_name, kind=kind)

    if kind is None:
        # Not an answer from the torpor servicer: the transport failed, or the peer is not
        # a torpor admin API at all.
        if code == grpc.StatusCode.UNAVAILABLE:
            return error(_cannot_reach(address, details))
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return error(
                f"the torpor admin API at {address} did not answer within {timeout:g}s "
                "(is torpor running? check control_plane.admin_api in the config)"
            )
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return error(
                f"{address} does not serve this admin call ({details or 'unimplemented'}); "
                "is control_plane.admin_api the address of the torpor admin API?"
            )
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return error(f"permission denied: {details or code_name}")
    if code == grpc.StatusCode.NOT_FOUND:
        return error(f"unknown service {name!r}" if name is not None else details)
    if details:
        return error(details)
    return error(f"the admin API call failed with {code_name}")


def format_ago(at: float | None, now: float) -> str:
    """`at` relative to `now`: "never", "12s ago", "5m ago", "3h ago", "2d ago"."""
    if at is None:
        return "never"
    seconds = max(0, int(now - at))
    if seconds < 60:
        return f"{seconds}s ago"
    if seconds < 3600:
        return f"{seconds // 60}m ago"
    if seconds < 86400:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


def format_state(status: Mapping[str, Any], now: float) -> str:
    """The STATE cell: the state, and for a wake under way how long it has been waking
    ("WAKING for 12 s", from the last transition into WAKING)."""
    state = str(status["state"])
    if state != "WAKING":
        return state
    since = next((t.get("at") for t in reversed(status.get("history") or [])
                  if t.get("to") == "WAKING"), None)
    return state if since is None else f"WAKING for {for_people(max(0.0, now - since))}"


def format_keep(seconds: float | None) -> str:
    """A keep-alive: "-" when unknown or never, else "45s", "10m", "2h30m" (whole seconds
    below a minute, at most two units)."""
    if seconds is None:
        return "-"
    rest = max(0, int(seconds))
    if rest < 60 and seconds < 10 and seconds != rest:
        return f"{seconds:.1f}s"
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        amount, rest = divmod(rest, size)
        if amount:
            parts.append(f"{amount}{unit}")
        if len(parts) == 2:
            break
    return "".join(parts) or "0s"


def format_next(at: float | None, now: float) -> str:
    """A predicted call: "-" for none, "in 5m", or "due" once its time has come."""
    if at is None:
        return "-"
    seconds = int(at - now)
    if seconds <= 0:
        return "due"
    if seconds < 60:
        return f"in {seconds}s"
    if seconds < 3600:
        return f"in {seconds // 60}m"
    if seconds < 86400:
        return f"in {seconds // 3600}h"
    return f"in {seconds // 86400}d"


def _format_clock(at: float, now: float) -> str:
    """Local wall-clock time of `at`; with the date when it is not today."""
    when = time.localtime(at)
    if time.strftime("%Y-%m-%d", when) == time.strftime("%Y-%m-%d", time.localtime(now)):
        return time.strftime("%H:%M:%S", when)
    return time.strftime("%Y-%m-%d %H:%M:%S", when)


def format_transition(transition: Mapping[str, Any], now: float) -> str:
    """One history line: "  14:02:11 ACTIVE -> HIBERNATING  (idle for 10m)"."""
    line = (
        f"  {_format_clock(float(transition['at']), now)} "
        f"{transition.get('from') or '(new)'} -> {transition['to']}"
    )
    reason = transition.get("reason")
    return f"{line}  ({reason})" if reason else line


def format_status_table(statuses: Sequence[Mapping[str, Any]], now: float | None = None) -> str:
    """The `torpor status` table: one aligned row per service, each followed by its last
    TABLE_HISTORY transitions. `statuses` are `status --json` dicts."""
    if not statuses:
        return "no services"
    current = time.time() if now is None else now
    headers = ("NAME", "STATE", "REPLICAS", "READY", "RECORDED", "LAST CALL", "KEEP",
               "NEXT CALL", "HOST")
    rows = [
        (
            str(status["name"]),
            format_state(status, current),
            str(status["replicas"]),
            str(len(status.get("ready_endpoints") or ())),
            str(status["recorded_replicas"]),
            format_ago(status.get("last_call"), current),
            format_keep(status.get("keep_alive")),
            format_next(status.get("next_call"), current),
            str(status.get("host") or ""),
        )
        for status in statuses
    ]
    widths = [max(len(row[i]) for row in (headers, *rows)) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    out = [line(headers).rstrip()]
    for status, row in zip(statuses, rows, strict=True):
        out.append(line(row).rstrip())
        if status.get("problem"):
            out.append(f"  PROBLEM (quarantined): {status['problem']}")
        if status.get("replica_problem"):
            out.append(f"  PROBLEM (replicas): {status['replica_problem']}")
        if status.get("versions"):
            out.append("  VERSIONS: " + ", ".join(
                f"{v['name']} weight {v['weight']} {v['state']} {v['replicas']}/"
                f"{v['recorded_replicas']}" for v in status["versions"]))
        history = status.get("history") or []
        out.extend(format_transition(t, current) for t in history[-TABLE_HISTORY:])
    return "\n".join(out)
