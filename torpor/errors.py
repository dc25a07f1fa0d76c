"""The whole exception tree of torpor, in one place (httpcore's habit).

Callers catch these, never a backend's own exceptions: a store or workloads backend
translates what its library raises into one of these.
"""


class TorporError(Exception):
    """Base of every error torpor raises on purpose."""


class ConfigError(TorporError):
    """A config file is invalid. The message names the file, the key and the problem."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {problem}")


class UnknownServiceError(TorporError):
    """A name or host is not in the service table."""


class InvalidTransitionError(TorporError):
    """A state change that the service state machine does not allow."""


class StoreError(TorporError):
    """The store could not be read or written."""


class ConflictError(StoreError):
    """A compare-and-set write lost a race: the record changed since it was read."""


class WorkloadError(TorporError):
    """Starting, stopping or scaling a workload failed."""


class NotSupportedError(TorporError):
    """The operation exists in the contract but is not implemented yet."""


class LockTimeoutError(TorporError):
    """A service lock could not be taken in time (another waker or reconciler holds it)."""


class WakeFailedError(TorporError):
    """A service did not become ready. `outcome` is "timeout" (not ready within
    wake_timeout) or "failed" (scaling failed, or the service lock was not free)."""

    def __init__(self, message: str, outcome: str) -> None:
        super().__init__(message)
        self.outcome = outcome


class AlreadyExistsError(TorporError):
    """A name or host is already taken: `torpor register` of a name the config file (or
    discovery) has, or of a host another service answers."""


class InvalidArgumentError(TorporError):
    """A request's argument fails its checks (a registered service's spec, or unregistering
    a service that was not registered)."""
