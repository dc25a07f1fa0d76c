"""What one process shares with the rest of its fleet, chosen once from `store.kind`.

sqlite (one machine): the sqlite store, in-process locks, no election (this process is the
only reconciler), no activator registry (the activator's address comes from the config).
etcd (a fleet): one connection and one lease per process (torpor/etcd/), the etcd store,
the lease lock, leader election for the reconciler, and the registry of activator
replicas. `close()` revokes the lease, so a clean stop leaves no lock, leadership or
registration behind.
"""

from __future__ import annotations

import dataclasses
import os
import socket

from torpor.config import Config
from torpor.errors import ConfigError
from torpor.etcd.connection import EtcdConnection, EtcdCredentials
from torpor.etcd.election import LeaderElection
from torpor.etcd.registry import ActivatorRegistry
from torpor.etcd.session import EtcdSession
from torpor.locks import LocalLocks, ServiceLocks
from torpor.store.base import Store


def default_member() -> str:
    """host name + process id: unique among processes, even on one machine."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclasses.dataclass
class Coordination:
    store: Store
    locks: ServiceLocks
    member: str
    session: EtcdSession | None = None
    election: LeaderElection | None = None
    registry: ActivatorRegistry | None = None

    @property
    def fleet(self) -> bool:
        return self.session is not None

    def is_leader(self) -> bool:
        """Whether this process may run the reconciler (always, without a fleet)."""
        return self.election is None or self.election.is_leader

    async def open(self) -> None:
        """Connect the store (raises StoreError with the reason when it cannot be used)."""
        await self.store.open()
        if self.session is not None:
            await self.session.lease_id()

    async def close(self) -> None:
        """Resign, deregister, close the store, then revoke the lease and disconnect."""
        if self.election is not None:
            await self.election.stop()
        if self.registry is not None:
            await self.registry.stop()
        await self.locks.close()  # background releases end: the revoke below frees the keys
        await self.store.close()
        if self.session is not None:
            await self.session.close()
            await self.session.conn.close()


def etcd_credentials(config: Config) -> EtcdCredentials:
    """store.tls, store.user and the password in store.password_file, as the etcd
    connection takes them. Raises ConfigError when the password file cannot be read."""
    store = config.store
    password = None
    if store.password_file is not None:
        try:
            password = store.password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(str(config.path), "store.password_file",
                              f"cannot read {store.password_file}: {exc}") from exc
    if store.user is not None and not password:
        raise ConfigError(str(config.path), "store.password_file",
                          "store.user needs its password: give the file that holds it")
    return EtcdCredentials(tls=store.tls, user=store.user, password=password)


def open_coordination(config: Config, member: str | None = None) -> Coordination:
    """The backends `config.store` names (not yet opened: `await coordination.open()`)."""
    store_config = config.store
    name = member or store_config.member or default_member()
    if store_config.kind == "sqlite":
        from torpor.store.sqlite import SqliteStore

        assert store_config.path is not None
        return Coordination(SqliteStore(store_config.path), LocalLocks(), name)
    if store_config.kind == "etcd":
        from torpor.locks.etcd import EtcdLocks
        from torpor.store.etcd import EtcdStore

        conn = EtcdConnection(store_config.endpoints, store_config.prefix, store_config.timeout,
                              etcd_credentials(config))
        session = EtcdSession(conn, store_config.lease_ttl, name)
        return Coordination(EtcdStore(conn, name), EtcdLocks(session), name, session,
                            LeaderElection(session), ActivatorRegistry(session))
    raise ConfigError(str(config.path), "store.kind",
                      f"store kind {store_config.kind!r} is not supported")
