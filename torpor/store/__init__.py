"""Durable service records. `open_store(config)` picks the backend once, from config."""

from __future__ import annotations

from torpor.config import StoreConfig
from torpor.errors import ConfigError
from torpor.store.base import Store


def open_store(config: StoreConfig, config_path: str = "config") -> Store:
    """The store backend the config names (not yet opened: call `await store.open()`)."""
    if config.kind == "sqlite":
        from torpor.store.sqlite import SqliteStore

        assert config.path is not None
        return SqliteStore(config.path)
    raise ConfigError(config_path, "store.kind", f"store kind {config.kind!r} is not supported yet")


__all__ = ["Store", "open_store"]
