"""RegisterService and UnregisterService over gRPC: the spec carried as JSON, torpor's
errors as status codes the CLI words, and the operator role required."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from protos import admin_pb2, admin_pb2_grpc
from tests.xds_server.test_admin_api import FakeAdmin, make_status
from torpor import admin_client
from torpor.admin_client import AdminError
from torpor.errors import AlreadyExistsError, InvalidArgumentError, UnknownServiceError
from torpor.model import ServiceStatus
from xds_server.admin_api import start_admin_server
from xds_server.admin_auth import AdminRole, required_role


class FakeRegistry:
    """Registers anything but "taken" and "bad"; unregisters what it registered."""

    def __init__(self) -> None:
        self.specs: dict[str, dict[str, Any]] = {}

    async def register(self, name: str, host: str, spec: dict[str, Any]) -> ServiceStatus:
        if name == "taken":
            raise AlreadyExistsError("service 'taken' is in the config file; the config wins")
        if name == "bad":
            raise InvalidArgumentError("registered service 'bad': replicas: expected ...")
        self.specs[name] = {**spec, "host": host}
        return make_status(name)

    async def unregister(self, name: str) -> None:
        if self.specs.pop(name, None) is None:
            raise UnknownServiceError(f"unknown service {name!r}")


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, FakeRegistry]]:
    registry = FakeRegistry()
    server, port = await start_admin_server("127.0.0.1:0", FakeAdmin([]), registry=registry)
    try:
        yield f"127.0.0.1:{port}", registry
    finally:
        await server.stop(None)


async def test_register_carries_the_spec_and_unregister_removes(
        served: tuple[str, FakeRegistry]) -> None:
    address, registry = served
    spec = {"replicas": 2, "local": {"command": ["python", "-m", "m", "{port}"]}}
    status = await asyncio.to_thread(admin_client.register, address, "r", "r.localhost", spec)
    assert status["name"] == "r"
    assert registry.specs == {"r": {**spec, "host": "r.localhost"}}
    await asyncio.to_thread(admin_client.unregister, address, "r")
    assert registry.specs == {}


@pytest.mark.parametrize(("name", "code", "words"), [
    ("taken", "ALREADY_EXISTS", "the config wins"),
    ("bad", "INVALID_ARGUMENT", "replicas"),
])
async def test_refusals_keep_their_words(served: tuple[str, FakeRegistry], name: str,
                                         code: str, words: str) -> None:
    address, _ = served
    with pytest.raises(AdminError) as info:
        await asyncio.to_thread(admin_client.register, address, name, "h.localhost", {})
    assert info.value.code == code and words in str(info.value)
    with pytest.raises(AdminError) as gone:
        await asyncio.to_thread(admin_client.unregister, address, "nobody")
    assert gone.value.code == "NOT_FOUND" and "unknown service 'nobody'" in str(gone.value)


async def test_a_spec_that_is_no_json_object_is_invalid(
        served: tuple[str, FakeRegistry]) -> None:
    address, _ = served
    async with grpc.aio.insecure_channel(address) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        for text in ("[1]", "{"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.RegisterService(admin_pb2.RegisterServiceRequest(
                    name="r", host="r.localhost", spec_json=text))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_without_a_registry_it_is_unimplemented() -> None:
    server, port = await start_admin_server("127.0.0.1:0", FakeAdmin([]))
    try:
        with pytest.raises(AdminError) as info:
            await asyncio.to_thread(admin_client.unregister, f"127.0.0.1:{port}", "r")
        assert info.value.code == "UNIMPLEMENTED"
    finally:
        await server.stop(None)


def test_registering_needs_the_operator() -> None:
    assert required_role("RegisterService") is AdminRole.OPERATOR
    assert required_role("UnregisterService") is AdminRole.OPERATOR
