"""Workloads run a service's replicas. `make_workloads(config)` picks the backend once."""

from __future__ import annotations

from torpor.config import Config
from torpor.errors import ConfigError
from torpor.workloads.base import Workloads


def make_workloads(config: Config) -> Workloads:
    """The workloads backend the config names (not yet started: call `await w.start()`)."""
    if config.workloads.kind == "local":
        from torpor.workloads.local import LocalWorkloads

        return LocalWorkloads(config.services, log_dir=str(config.log_dir()),
                              ports=config.workloads.ports)
    if config.workloads.kind == "kubernetes":
        from torpor.workloads.kubernetes import KubernetesWorkloads

        return KubernetesWorkloads(config.services, config.workloads)
    raise ConfigError(
        str(config.path), "workloads.kind", f"{config.workloads.kind!r} is not supported yet"
    )


__all__ = ["Workloads", "make_workloads"]
