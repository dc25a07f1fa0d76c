"""Per-service locks: one actor at a time changes a service's workload (wake or hibernate).

`LocalLocks` serves one process (`torpor up`); the etcd lease lock implements the same
interface for a fleet of activators and control planes.
"""

from torpor.locks.base import LockTimeoutError, ServiceLocks
from torpor.locks.local import LocalLocks

__all__ = ["LocalLocks", "LockTimeoutError", "ServiceLocks", "lock_key"]


def lock_key(service: str) -> str:
    """The one lock name both the waker and the reconciler take for `service`."""
    return f"wake/{service}"
