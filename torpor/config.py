"""Config: the YAML of DESIGN.md loaded into typed, validated objects.

Owns: parsing, defaults and validation. A bad file raises ConfigError naming the file, the
key and the problem, before anything starts. Must not start anything or touch the network.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Address:
    """A host:port pair. Config addresses are loopback or 0.0.0.0; `port` may be 0 only in tests."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    listen: Address
    admin: Address


@dataclasses.dataclass(frozen=True)
class ControlPlaneConfig:
    xds: Address
    admin_api: Address
    metrics: Address
    # How long a staged push waits for every Envoy to ACK one stage before going on.
    ack_timeout: float = 10.0
    # The node id Envoys started by torpor use (torpor envoy-bootstrap, torpor up).
    node_id: str = "torpor-gateway"


@dataclasses.dataclass(frozen=True)
class ActivatorConfig:
    listen: Address
    metrics: Address
    max_held_per_service: int = 1000
    wake_timeout: float = 120.0


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    kind: str  # "sqlite" | "etcd"
    path: Path | None = None  # sqlite: resolved relative to the config file's folder
    endpoints: tuple[str, ...] = ()  # etcd


@dataclasses.dataclass(frozen=True)
class WorkloadsConfig:
    kind: str  # "local" | "kubernetes"


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    idle_after: float = 600.0
    evict_after: float = 86400.0
    creation_grace: float = 300.0
    check_every: float = 10.0


@dataclasses.dataclass(frozen=True)
class LocalServiceConfig:
    command: tuple[str, ...]  # "{port}" is replaced by the replica's port
    ready_path: str = "/healthz"
    # Working directory of the processes; default: the config file's folder.
    cwd: Path | None = None
    env: tuple[tuple[str, str], ...] = ()
    # SIGTERM, then SIGKILL after this many seconds.
    stop_grace: float = 10.0


@dataclasses.dataclass(frozen=True)
class KubernetesServiceConfig:
    namespace: str
    deployment: str
    port: int


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    name: str
    host: str
    replicas: int = 1
    local: LocalServiceConfig | None = None
    kubernetes: KubernetesServiceConfig | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    path: Path  # the file it was loaded from (for messages and relative paths)
    gateway: GatewayConfig
    control_plane: ControlPlaneConfig
    activator: ActivatorConfig
    store: StoreConfig
    workloads: WorkloadsConfig
    policy: PolicyConfig
    services: tuple[ServiceConfig, ...]

    def service(self, name: str) -> ServiceConfig | None:
        return next((s for s in self.services if s.name == name), None)
