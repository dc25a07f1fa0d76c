"""The admin API over gRPC: serves a torpor.admin.ServiceAdmin as protos/admin.proto.

Owns: converting ServiceStatus to its proto message, translating torpor errors into gRPC
status codes, and starting the grpc.aio server. Must not decide anything about services:
every operation is the ServiceAdmin's; this module only carries it over the wire.
The client side (message → status dict) lives in torpor/admin_client.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from protos import admin_pb2, admin_pb2_grpc
from torpor.admin import ServiceAdmin, ServiceRegistry, TrafficAdmin
from torpor.errors import (
    AlreadyExistsError,
    ConfigError,
    ConflictError,
    InvalidArgumentError,
    InvalidTransitionError,
    LockTimeoutError,
    NotSupportedError,
    StoreError,
    TorporError,
    UnknownServiceError,
    WakeFailedError,
    WorkloadError,
)
from torpor.ledger import Savings, total
from torpor.logs import event
from torpor.model import ServiceStatus, TrafficChange

logger = logging.getLogger(__name__)

#: Trailing-metadata key naming the torpor error class behind a failed call. Lets the client
#: tell an UNAVAILABLE sent by the server (store down) from a server it cannot reach.
ERROR_KIND_KEY = "torpor-error"

T = TypeVar("T")

#: The savings report of a control plane (xds_server/savings.py SavingsKeeper.report):
#: seconds back (None: everything) → (service name, savings) sorted by name.
SavingsReport = Callable[[float | None], Awaitable[list[tuple[str, Savings]]]]

#: Most specific first: the first class the error is an instance of decides the code.
_ERROR_CODES: tuple[tuple[type[TorporError], Any], ...] = (
    (UnknownServiceError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotSupportedError, grpc.StatusCode.UNIMPLEMENTED),
    (InvalidTransitionError, grpc.StatusCode.FAILED_PRECONDITION),
    (ConflictError, grpc.StatusCode.ABORTED),
    (LockTimeoutError, grpc.StatusCode.ABORTED),
    (WakeFailedError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (StoreError, grpc.StatusCode.UNAVAILABLE),
    (WorkloadError, grpc.StatusCode.UNAVAILABLE),
    (ConfigError, grpc.StatusCode.INTERNAL),
)


def status_code_for(error: TorporError) -> Any:
    """The grpc.StatusCode that reports `error` (INTERNAL for a TorporError not listed)."""
    for error_type, code in _ERROR_CODES:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def status_to_message(status: ServiceStatus) -> Any:
    """ServiceStatus → admin_pb2.ServiceStatus (last_call, keep_alive, next_call left unset
    when None)."""
    message = admin_pb2.ServiceStatus(
        name=status.name,
        host=status.host,
        state=status.state.value,
        replicas=status.replicas,
        desired_replicas=status.desired_replicas,
        recorded_replicas=status.recorded_replicas,
        ready_endpoints=[str(endpoint) for endpoint in status.ready_endpoints],
        created_at=status.created_at,
        updated_at=status.updated_at,
        history=[
            admin_pb2.Transition(
                at=transition.at,
                from_state=transition.from_state.value if transition.from_state else "",
                to_state=transition.to_state.value,
                reason=transition.reason,
            )
            for transition in status.history
        ],
    )
    if status.last_call is not None:
        message.last_call = status.last_call
    if status.keep_alive is not None:
        message.keep_alive = status.keep_alive
    if status.next_call is not None:
        message.next_call = status.next_call
    if status.problem is not None:
        message.problem = status.problem
    if status.replica_problem is not None:
        message.replica_problem = status.replica_problem
    if status.source is not None:
        message.source = status.source
    for field in ("group", "wake_timeout", "max_held", "activation_replicas", "min_awake",
                  "rewrite"):
        value = getattr(status, field)
        if value is not None:
            setattr(message, field, value)
    message.hosts.extend(status.hosts)
    message.paths.extend(status.paths)
    message.versions.extend(admin_pb2.VersionStatus(
        name=v.name, weight=v.weight, state=v.state.value, replicas=v.replicas,
        recorded_replicas=v.recorded_replicas) for v in status.versions)
    return message


def traffic_to_message(change: TrafficChange) -> Any:
    message = admin_pb2.TrafficResponse(name=change.name, push_seconds=change.push_seconds,
                                        applied=change.applied)
    message.weights.update(change.weights)
    message.previous.update(change.previous or {})
    return message


def savings_to_message(name: str, savings: Savings) -> Any:
    """(name, Savings) → admin_pb2.ServiceSavings."""
    return admin_pb2.ServiceSavings(
        name=name, replica_seconds_saved=savings.replica_seconds_saved,
        replica_seconds_idle=savings.replica_seconds_idle, cold_starts=savings.cold_starts,
        cold_start_seconds=savings.cold_start_seconds, prewakes=savings.prewakes,
        prewakes_wasted=savings.prewakes_wasted)


def _error_kind(error: BaseException) -> tuple[tuple[str, str], ...]:
    return ((ERROR_KIND_KEY, type(error).__name__),)


class AdminServicer:
    """Implements the Admin service of protos/admin.proto on top of a ServiceAdmin.

    Registered with `admin_pb2_grpc.add_AdminServicer_to_server`, which only needs the
    methods; it does not subclass the generated (untyped) AdminServicer.
    """

    def __init__(self, admin: ServiceAdmin, report: SavingsReport | None = None,
                 registry: ServiceRegistry | None = None,
                 traffic: TrafficAdmin | None = None) -> None:
        self._admin = admin
        self._report = report
        self._registry = registry
        self._traffic = traffic

    async def ListServices(self, request: Any, context: Any) -> Any:
        statuses = await self._call("ListServices", "", context, self._admin.statuses)
        return admin_pb2.ListServicesResponse(services=[status_to_message(s) for s in statuses],
                                              problems=self._admin.problems())

    async def GetService(self, request: Any, context: Any) -> Any:
        name = await self._required_name(request, context)
        status = await self._call("GetService", name, context, lambda: self._admin.status(name))
        return status_to_message(status)

    async def Hibernate(self, request: Any, context: Any) -> Any:
        name = await self._required_name(request, context)
        status = await self._call("Hibernate", name, context, lambda: self._admin.hibernate(name))
        return status_to_message(status)

    async def Wake(self, request: Any, context: Any) -> Any:
        name = await self._required_name(request, context)
        status = await self._call("Wake", name, context, lambda: self._admin.wake(name))
        return status_to_message(status)

    async def WaitRouted(self, request: Any, context: Any) -> Any:
        name = await self._required_name(request, context)
        status = await self._call("WaitRouted", name, context,
                                  lambda: self._admin.wait_routed(name))
        return status_to_message(status)

    async def Report(self, request: Any, context: Any) -> Any:
        since = request.since_seconds if request.HasField("since_seconds") else None
        if since is not None and since <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "since must be positive")
        rows = await self._call("Report", "", context, lambda: self._savings(since))
        return admin_pb2.ReportResponse(
            services=[savings_to_message(name, savings) for name, savings in rows],
            total=savings_to_message("total", total(rows)), generated_at=time.time())

    async def RegisterService(self, request: Any, context: Any) -> Any:
        name = await self._required_name(request, context)
        spec = await self._spec(request, context)
        status = await self._call("RegisterService", name, context,
                                  lambda: self._registration().register(
                                      name, str(request.host), spec))
        return status_to_message(status)

    async def UnregisterService(self, request: Any, context: Any) -> Any:
        name = await self._required_name(request, context)
        await self._call("UnregisterService", name, context,
                         lambda: self._registration().unregister(name))
        return admin_pb2.UnregisterServiceResponse()

    async def SetTraffic(self, request: Any, context: Any) -> Any:
        name = await self._required_name(request, context)
        weights = {str(k): int(v) for k, v in request.weights.items()}
        change = await self._call("SetTraffic", name, context,
                                  lambda: self._traffic_admin().set_traffic(name, weights))
        return traffic_to_message(change)

    async def Promote(self, request: Any, context: Any) -> Any:
        name = await self._required_name(request, context)
        change = await self._call("Promote", name, context,
                                  lambda: self._traffic_admin().promote(
                                      name, str(request.version)))
        return traffic_to_message(change)

    async def Rollback(self, request: Any, context: Any) -> Any:
        name = await self._required_name(request, context)
        change = await self._call("Rollback", name, context,
                                  lambda: self._traffic_admin().rollback(name))
        return traffic_to_message(change)

    def _traffic_admin(self) -> TrafficAdmin:
        if self._traffic is None:
            raise NotSupportedError("this admin API changes no traffic")
        return self._traffic

    def _registration(self) -> ServiceRegistry:
        if self._registry is None:
            raise NotSupportedError("this admin API registers no services")
        return self._registry

    @staticmethod
    async def _spec(request: Any, context: Any) -> dict[str, Any]:
        """spec_json as a JSON object ({} when empty)."""
        text = str(request.spec_json) or "{}"
        try:
            spec = json.loads(text)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"spec_json is not JSON: {exc}")
        if not isinstance(spec, dict):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "spec_json must be a JSON object")
        return {str(key): value for key, value in spec.items()}

    async def _savings(self, since: float | None) -> list[tuple[str, Savings]]:
        if self._report is None:
            raise NotSupportedError("this process keeps no savings ledger")
        return await self._report(since)

    @staticmethod
    async def _required_name(request: Any, context: Any) -> str:
        name = str(request.name)
        if not name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a service name is required")
        return name

    @staticmethod
    async def _call(rpc: str, service: str, context: Any, op: Callable[[], Awaitable[T]]) -> T:
        """Run `op`; a failure ends the call with the matching status code and message."""
        try:
            return await op()
        except TorporError as exc:
            code = status_code_for(exc)
            event(
                logger,
                "admin_call_failed",
                level=logging.WARNING,
                rpc=rpc,
                service=service,
                code=code.name,
                error=str(exc),
            )
            await context.abort(code, str(exc) or type(exc).__name__, _error_kind(exc))
        except Exception as exc:
            logger.error(
                "admin_call_crashed",
                exc_info=True,
                extra={"rpc": rpc, "service": service, "error": repr(exc)},
            )
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error in {rpc}: {exc!r}", _error_kind(exc)
            )
        raise AssertionError("context.abort returned")  # pragma: no cover


async def start_admin_server(address: str, admin: ServiceAdmin,
                             report: SavingsReport | None = None,
                             interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                             credentials: grpc.ServerCredentials | None = None,
                             registry: ServiceRegistry | None = None,
                             traffic: TrafficAdmin | None = None,
                             ) -> tuple[grpc.aio.Server, int]:
    """Serve `admin` (and `report`, for the Report RPC) on `address` ("host:port"; port 0
    picks a free one). `interceptors`: the token check (xds_server/admin_auth.py); the
    control plane always passes it, tests of the servicer alone may not. `credentials`:
    serve TLS (xds_server/admin_auth.py server_tls), else plaintext. `registry`: what
    RegisterService and UnregisterService change (None: both UNIMPLEMENTED).

    Returns the started server and the bound port. Stop it with `await server.stop(grace)`.
    Raises TorporError if the address cannot be bound (in use, or not a host:port).
    """
    # SO_REUSEPORT off: a second torpor on the same port must fail, not share it.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)],
                             interceptors=list(interceptors) or None)
    admin_pb2_grpc.add_AdminServicer_to_server(
        AdminServicer(admin, report, registry, traffic), server)
    try:
        port = int(server.add_secure_port(address, credentials) if credentials is not None
                   else server.add_insecure_port(address))
    except RuntimeError as exc:
        port = 0
        cause: BaseException | None = exc
    else:
        cause = None
    if port == 0:
        await server.stop(None)
        raise TorporError(
            f"cannot serve the torpor admin API on {address!r}: the port is in use or the "
            "address is not a valid host:port (check control_plane.admin_api in the config)"
        ) from cause
    await server.start()
    event(logger, "admin_api_started", address=address, port=port)
    return server, port
