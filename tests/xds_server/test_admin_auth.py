"""The admin API's tokens: the real grpc.aio admin server with the token interceptor
(xds_server/admin_auth.py), a fake ServiceAdmin, and the CLI's client and verbs."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from assembly.cli import main
from tests.xds_server.test_admin_api import FakeAdmin, make_status
from torpor import admin_client
from torpor.admin_client import AdminError
from torpor.certs import make_certs, write_certs
from torpor.config import AdminTlsConfig, load_config
from torpor.credentials import (
    TOKEN_ENV,
    AdminRole,
    AdminTarget,
    AdminTokens,
    admin_target,
    bearer_token,
    created_token_path,
    ensure_token_file,
)
from torpor.model import ServiceState
from xds_server.admin_api import start_admin_server
from xds_server.admin_auth import AdminAuthInterceptor, denial, required_role, server_tls

OPERATOR = "op-" + "x" * 40
READER = "ro-" + "y" * 40


@pytest.fixture
async def guarded() -> AsyncIterator[str]:
    """An admin API that knows one operator and one read-only token; its address."""
    fake = FakeAdmin([make_status("echo"), make_status("sleepy", ServiceState.HIBERNATED,
                                                       replicas=0)])
    tokens = AdminTokens.of(operator=OPERATOR, read_only=READER)
    server, port = await start_admin_server("127.0.0.1:0", fake,
                                            interceptors=[AdminAuthInterceptor(tokens)])
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def test_reads_need_read_only_and_everything_else_operator() -> None:
    for rpc in ("ListServices", "GetService", "WaitRouted", "Report"):
        assert required_role(rpc) is AdminRole.READ_ONLY
    for rpc in ("Hibernate", "Wake", "SetTraffic", "SomethingAddedLater"):
        assert required_role(rpc) is AdminRole.OPERATOR
    assert denial("ListServices", presented=False, role=None).code == "UNAUTHENTICATED"
    assert denial("ListServices", presented=True, role=None).code == "UNAUTHENTICATED"
    assert denial("ListServices", presented=True, role=AdminRole.READ_ONLY) is None
    refused = denial("Wake", presented=True, role=AdminRole.READ_ONLY)
    assert refused is not None and refused.code == "PERMISSION_DENIED"
    assert "operator" in refused.why
    assert denial("Wake", presented=True, role=AdminRole.OPERATOR) is None


def test_tokens_match_only_exactly_and_bearer_is_parsed() -> None:
    tokens = AdminTokens.of(operator=OPERATOR, read_only=READER)
    assert tokens.role_of(OPERATOR) is AdminRole.OPERATOR
    assert tokens.role_of(READER) is AdminRole.READ_ONLY
    assert tokens.role_of(OPERATOR[:-1]) is None
    assert tokens.role_of("") is None
    assert OPERATOR not in repr(tokens)  # only digests are kept
    assert bearer_token(f"Bearer {OPERATOR}") == OPERATOR
    assert bearer_token(f"bearer  {OPERATOR} ") == OPERATOR
    assert bearer_token(f"Basic {OPERATOR}") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


async def test_without_a_token_every_call_is_denied(guarded: str) -> None:
    for call in (lambda: admin_client.list_statuses(guarded),
                 lambda: admin_client.hibernate(guarded, "echo"),
                 lambda: admin_client.wake(guarded, "sleepy")):
        with pytest.raises(AdminError) as info:
            await asyncio.to_thread(call)
        assert info.value.code == "UNAUTHENTICATED"
        assert str(info.value).startswith("permission denied: ")
        assert "carried none" in str(info.value)


async def test_a_wrong_token_is_denied(guarded: str) -> None:
    with pytest.raises(AdminError) as info:
        await asyncio.to_thread(admin_client.list_statuses,
                                AdminTarget(guarded, token=OPERATOR + "z"))
    assert info.value.code == "UNAUTHENTICATED"
    assert "not valid" in str(info.value)


async def test_read_only_token_reads_but_cannot_hibernate_or_wake(guarded: str) -> None:
    reader = AdminTarget(guarded, token=READER)
    statuses = await asyncio.to_thread(admin_client.list_statuses, reader)
    assert [s["name"] for s in statuses] == ["echo", "sleepy"]
    assert (await asyncio.to_thread(admin_client.get_status, reader, "echo"))["name"] == "echo"
    for call in (lambda: admin_client.hibernate(reader, "echo"),
                 lambda: admin_client.wake(reader, "sleepy")):
        with pytest.raises(AdminError) as info:
            await asyncio.to_thread(call)
        assert info.value.code == "PERMISSION_DENIED"
        assert str(info.value).startswith("permission denied: ")
    # Nothing changed: the denied wake never reached the servicer.
    assert (await asyncio.to_thread(admin_client.get_status, reader, "sleepy"))["state"] == \
        "HIBERNATED"


async def test_operator_token_does_everything(guarded: str) -> None:
    operator = AdminTarget(guarded, token=OPERATOR)
    assert len(await asyncio.to_thread(admin_client.list_statuses, operator)) == 2
    woken = await asyncio.to_thread(admin_client.wake, operator, "sleepy")
    assert woken["state"] == "WAKING"
    with pytest.raises(AdminError) as info:  # reached the servicer: its own answer
        await asyncio.to_thread(admin_client.hibernate, operator, "echo")
    assert info.value.code == "UNIMPLEMENTED" and info.value.kind == "NotSupportedError"


async def test_token_from_the_environment_wins(guarded: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, READER)
    target = AdminTarget(guarded, token_files=(Path("/nonexistent"),))
    assert len(await asyncio.to_thread(admin_client.list_statuses, target)) == 2


def test_created_token_is_owner_only_random_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "admin-token"
    first = ensure_token_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 40
    assert ensure_token_file(path) == first  # a restart keeps it: running CLIs still work
    path.chmod(0o644)
    assert ensure_token_file(path) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_token_file(tmp_path / "other") != first


def _config(tmp_path: Path, port: int, tokens: str = "") -> Path:
    path = tmp_path / "torpor.yaml"
    path.write_text(f"control_plane: {{admin_api: 127.0.0.1:{port}{tokens}}}\n"
                    "store: {kind: sqlite, path: ./state.db}\nservices: []\n")
    return path


def test_client_finds_the_operator_file_then_read_only_then_the_created_one(
        tmp_path: Path) -> None:
    (tmp_path / "op").write_text(OPERATOR + "\n")
    (tmp_path / "ro").write_text(READER)
    config = load_config(_config(tmp_path, 1, ", admin_tokens: {operator: op, read_only: ro}"))
    target = admin_target(config)
    assert target.token_files == (tmp_path / "op", tmp_path / "ro")
    assert target.bearer() == OPERATOR
    (tmp_path / "op").chmod(0)
    if os.getuid() != 0:  # root reads anything
        assert target.bearer() == READER
    plain = load_config(_config(tmp_path, 1))
    assert admin_target(plain).token_files == (created_token_path(plain),)
    assert created_token_path(plain) == tmp_path / "torpor-logs" / "admin-token"
    server_side = AdminTokens.from_config(plain)  # creates it
    assert server_side.role_of(admin_target(plain).bearer() or "") is AdminRole.OPERATOR


async def test_cli_verbs_find_the_token_through_config_and_say_permission_denied(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeAdmin([make_status("echo"),
                      make_status("sleepy", ServiceState.HIBERNATED, replicas=0)])
    config_path = _config(tmp_path, 0)
    tokens = AdminTokens.from_config(load_config(config_path))  # what a control plane does
    server, port = await start_admin_server("127.0.0.1:0", fake,
                                            interceptors=[AdminAuthInterceptor(tokens)])
    try:
        config_path = _config(tmp_path, port)
        assert await asyncio.to_thread(main, ["status", "--json", "--config",
                                              str(config_path)]) == 0
        assert '"name": "echo"' in capsys.readouterr().out
        assert await asyncio.to_thread(main, ["wake", "sleepy", "--config",
                                              str(config_path)]) == 0
        # Someone without the token file: denied, one line, no traceback.
        created_token_path(load_config(config_path)).rename(tmp_path / "moved")
        assert await asyncio.to_thread(main, ["hibernate", "echo", "--config",
                                              str(config_path)]) == 1
        # (the server's log line shares this process's stderr: only the CLI's line counts)
        err = [line for line in capsys.readouterr().err.splitlines()
               if not line.startswith("{")]
        assert len(err) == 1 and err[0].startswith("torpor: permission denied: ")
        assert "admin-token" in err[0]  # where the CLI looked
        # A read-only token: status works, wake is refused.
        (tmp_path / "ro").write_text(READER)
        reader_server, reader_port = await start_admin_server(
            "127.0.0.1:0", fake,
            interceptors=[AdminAuthInterceptor(AdminTokens.of(OPERATOR, READER))])
        try:
            reader_config = _config(tmp_path, reader_port, ", admin_tokens: {read_only: ro}")
            assert await asyncio.to_thread(main, ["status", "--config",
                                                  str(reader_config)]) == 0
            assert await asyncio.to_thread(main, ["wake", "echo", "--config",
                                                  str(reader_config)]) == 1
            err = capsys.readouterr().err
            assert "permission denied: Wake changes state and needs the operator token" in err
        finally:
            await reader_server.stop(None)
    finally:
        await server.stop(None)


async def test_over_tls_the_token_is_not_sent_in_the_clear(tmp_path: Path) -> None:
    certs, other = tmp_path / "certs", tmp_path / "other"
    write_certs(certs, make_certs())
    write_certs(other, make_certs())
    tls = AdminTlsConfig(cert=certs / "server.pem", key=certs / "server-key.pem",
                         ca=certs / "ca.pem")
    fake = FakeAdmin([make_status("echo")])
    server, port = await start_admin_server(
        "127.0.0.1:0", fake, credentials=server_tls(tls),
        interceptors=[AdminAuthInterceptor(AdminTokens.of(OPERATOR, READER))])
    address = f"127.0.0.1:{port}"
    try:
        trusted = AdminTarget(address, token=READER, ca=tls.ca)
        assert len(await asyncio.to_thread(admin_client.list_statuses, trusted)) == 1
        for target in (AdminTarget(address, token=READER),  # plaintext to a TLS port
                       AdminTarget(address, token=READER, ca=other / "ca.pem")):  # wrong CA
            with pytest.raises(AdminError) as info:
                await asyncio.to_thread(admin_client.list_statuses, target, 3.0)
            assert info.value.code == "UNAVAILABLE", target
        with pytest.raises(AdminError) as info:  # TLS is no token
            await asyncio.to_thread(admin_client.list_statuses, AdminTarget(address, ca=tls.ca))
        assert info.value.code == "UNAUTHENTICATED"
    finally:
        await server.stop(None)
    # The config gives clients the CA and the server its certificate.
    config = load_config(_config(tmp_path, port, ", admin_tls: {cert: certs/server.pem, "
                                                 "key: certs/server-key.pem, ca: certs/ca.pem}"))
    assert config.control_plane.admin_tls == tls
    assert admin_target(config).ca == tls.ca
