"""The lock interface the waker and the reconciler share.

Owns the contract only. A lock is named (e.g. "wake/echo"); holding it means no other
holder of the same name, in this process or (etcd) anywhere in the fleet, is changing that
service's replicas or state. Must not know what the names mean.
"""

from __future__ import annotations

import abc
from contextlib import AbstractAsyncContextManager

from torpor.errors import LockTimeoutError

__all__ = ["LockTimeoutError", "ServiceLocks"]


class ServiceLocks(abc.ABC):
    """Named mutual-exclusion locks."""

    @abc.abstractmethod
    def hold(self, name: str, timeout: float) -> AbstractAsyncContextManager[None]:
        """`async with locks.hold(name, timeout):` — waits at most `timeout` seconds for the
        lock, raising LockTimeoutError, and releases it on exit, even on error or cancel."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Release what the implementation keeps (leases, sessions)."""
