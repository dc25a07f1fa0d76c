"""Fixtures every test folder may use."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.etcd import EtcdServer, stop_etcd


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """cli.main installs a root log handler (on captured stderr): take it away afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    """A real etcd on loopback ports with its data in tmp_path; stopped afterwards, always."""
    server = EtcdServer(tmp_path / "etcd")
    try:
        server.start()
        await server.wait_ready()
        yield server
    finally:
        await stop_etcd(server)
