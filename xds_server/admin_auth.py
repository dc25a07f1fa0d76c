"""Who may call which admin RPC: a bearer token checked before the servicer runs.

Owns: the table of read-only RPCs (everything else needs the operator role, so an RPC
added later is guarded by default), the decision for one call (pure: `denial`), and the
grpc.aio server interceptor that applies it. Tokens and their digests are
torpor/credentials.py's. Must not know what the RPCs do.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from torpor.config import AdminTlsConfig
from torpor.credentials import METADATA_KEY, AdminRole, AdminTokens, bearer_token
from torpor.errors import TorporError
from torpor.logs import event

logger = logging.getLogger(__name__)

#: RPCs that only read: a read-only token may call them. Every other RPC of the Admin
#: service (Hibernate, Wake, and whatever changes state later) needs the operator token.
READ_ONLY_RPCS = frozenset({"ListServices", "GetService", "WaitRouted", "Report"})


@dataclasses.dataclass(frozen=True)
class Denial:
    """Why a call is refused: `code` is the gRPC status code name."""

    code: str  # "UNAUTHENTICATED" | "PERMISSION_DENIED"
    why: str


def required_role(rpc: str) -> AdminRole:
    """The least role that may call `rpc` (its bare name, e.g. "Hibernate")."""
    return AdminRole.READ_ONLY if rpc in READ_ONLY_RPCS else AdminRole.OPERATOR


def denial(rpc: str, presented: bool, role: AdminRole | None) -> Denial | None:
    """None if a caller that `presented` a token granting `role` may call `rpc`."""
    if not presented:
        return Denial("UNAUTHENTICATED", f"{rpc} needs an admin token and the call carried "
                                         "none")
    if role is None:
        return Denial("UNAUTHENTICATED", f"{rpc}: the admin token is not valid")
    if required_role(rpc) is AdminRole.OPERATOR and role is not AdminRole.OPERATOR:
        return Denial("PERMISSION_DENIED", f"{rpc} changes state and needs the operator "
                                           "token; this token is read-only")
    return None


def server_tls(tls: AdminTlsConfig) -> grpc.ServerCredentials:
    """The admin API's TLS (no client certificate: the token authenticates the caller).
    Raises TorporError naming a file that cannot be read."""
    files = {}
    for key in ("cert", "key"):
        path = getattr(tls, key)
        try:
            files[key] = path.read_bytes()
        except OSError as exc:
            raise TorporError(f"control_plane.admin_tls.{key}: cannot read {path}: "
                              f"{exc.strerror}") from exc
    return grpc.ssl_server_credentials([(files["key"], files["cert"])])


def rpc_name(method: str) -> str:
    """"/torpor.admin.Admin/Hibernate" → "Hibernate"."""
    return method.rsplit("/", 1)[-1]


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses a call whose token does not grant the role its RPC needs, before the
    servicer sees it (the servicer's own errors stay its own)."""

    def __init__(self, tokens: AdminTokens) -> None:
        self._tokens = tokens

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        rpc = rpc_name(str(details.method))
        metadata = {str(k).lower(): v for k, v in (details.invocation_metadata or ())}
        value = metadata.get(METADATA_KEY)
        token = bearer_token(value if isinstance(value, str) else None)
        role = self._tokens.role_of(token) if token is not None else None
        refused = denial(rpc, token is not None, role)
        if refused is None:
            return await continuation(details)
        event(logger, "admin_call_denied", level=logging.WARNING, rpc=rpc, code=refused.code,
              reason=refused.why)
        return _refusing_handler(refused)


def _refusing_handler(refused: Denial) -> Any:
    """A unary handler that ends the call with the denial (every Admin RPC is unary)."""
    code = getattr(grpc.StatusCode, refused.code)

    async def refuse(request: Any, context: Any) -> Any:
        await context.abort(code, refused.why)

    return grpc.unary_unary_rpc_method_handler(refuse)
