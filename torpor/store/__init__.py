"""Durable service records: sqlite for one machine (store/sqlite.py), etcd for a fleet
(store/etcd.py). torpor/coordination.py picks the backend once, from config."""

from __future__ import annotations

from torpor.store.base import Store

__all__ = ["Store"]
