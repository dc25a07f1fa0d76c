"""A standalone activator (`torpor activator`, sqlite store, local workloads) next to a
standalone control plane (`torpor xds-server`), with a real Envoy and a second, slow "Envoy":
a raw ADS client on the same control plane that can hold its ACKs (tests/support/ads_client.py).

What it shows: a held gRPC request of a sleeping HTTP/2 service is told to replay (503 +
x-torpor-retry, which the real Envoy turns into a replay to the replicas) only once EVERY
Envoy of the control plane has applied the flip back to the replicas. While the slow client
holds the ACK of the flip, the call stays pending, although the service is ACTIVE with a
ready replica and the real Envoy already routes to it; it completes only after the release.
And when the slow client never ACKs (past control_plane.ack_timeout), the held call is
answered UNAVAILABLE ("did not confirm its route") rather than replayed.

Which part holds the call: in this mode the activator wakes through the admin RPC Wake,
whose answer already waits for the push of the flip to be ACKed by every Envoy, up to
ack_timeout (ControlPlaneAdmin.wake → EnvoyRouting.push). So within ack_timeout (the
first test) the call is held by the Wake RPC, and an activator without the WaitRouted
confirmation holds it just as long. Only past ack_timeout does the confirmation make the
difference: Wake then answers anyway, and WaitRouted refuses (the second test, which an
activator without the confirmation fails: its call is replayed and answered).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.ads_client import AdsClient, Response
from tests.support.envoy import Envoy
from tests.support.net import wait_until
from tests.support.split_stack import (
    HOST,
    SERVICE,
    SplitStack,
    describe,
    split_config,
    torpor_proc,
    wait_logged,
)
from tests.support.up import status_json

pytestmark = pytest.mark.envoy

GRPC_ECHO = Path(__file__).resolve().parents[1] / "support" / "grpc_echo.py"
#: How long the slow client keeps holding the ACK of the flip once everything else is
#: in place (the real Envoy routes to the ready replica): the call must still be pending.
HOLD_AFTER_CONDITIONS = 2.0


def write_config(tmp: Path, ack_timeout: str, replica: str) -> tuple[Path, dict[str, int]]:
    """sqlite store, local workloads: the service's one replica is a grpc_echo."""
    services = f"""  - name: {SERVICE}
    host: {HOST}
    replicas: 1
    protocol: http2
    local:
      command: [{sys.executable}, {GRPC_ECHO}, --port, "{{port}}", --name, {replica},
                --load-seconds, "1"]
      ready_probe: tcp
      stop_grace: 5s
"""
    return split_config(tmp, store="{kind: sqlite, path: ./state.db}",
                        workloads="{kind: local}", services=services,
                        control_plane_extra=f"ack_timeout: {ack_timeout}",
                        activator_extra="wake_timeout: 60s")


@pytest.fixture
async def start_stack(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[SplitStack]]]:
    """start_stack(ack_timeout) starts `torpor xds-server`, the slow ADS client, `torpor
    activator` and a real Envoy, and waits until the service is ACTIVE behind Envoy.
    Everything it started is stopped at teardown, whatever happened."""
    stacks: list[SplitStack] = []

    async def start(ack_timeout: str) -> SplitStack:
        replica = f"standalone-echo-{uuid.uuid4().hex[:8]}"
        config, ports = write_config(tmp_path, ack_timeout, replica)
        stack = SplitStack(
            tmp_path, config, ports,
            control_plane=torpor_proc(tmp_path, "xds-server", config),
            activator=torpor_proc(tmp_path, "activator", config),
            envoy=Envoy(tmp_path, "real-envoy", ports["admin"], ports["xds"]),
            slow=AdsClient(f"127.0.0.1:{ports['xds']}", "slow-envoy"), replica=replica)
        stacks.append(stack)
        await stack.start(lambda: wait_logged(stack.activator, "activator.h2.listening"))
        return stack

    yield start
    problems = []
    left = []
    for stack in stacks:
        problems += await stack.stop()
        left += stack.replica_processes()
    assert not left, f"replicas left running: {left}"
    assert not problems, problems


async def _hibernate(stack: SplitStack) -> None:
    """`torpor hibernate` while every Envoy ACKs; then asleep everywhere."""
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "assembly.cli", "hibernate", SERVICE, "--config",
         str(stack.config)], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    status = await stack.status()
    assert status["state"] == "HIBERNATED" and not status["ready_endpoints"], status

    async def asleep() -> bool:
        hosts = (await stack.envoy.cluster_hosts()).get(SERVICE, set())
        return (hosts == {stack.activator_h2} and stack.slow.held is None
                and stack.slow.last_endpoints(SERVICE) == {stack.activator_h2}
                and not stack.replica_processes())

    await wait_until(asleep, 30, f"{SERVICE} routed to the activator everywhere, no replica",
                     interval=0.1)


async def test_held_grpc_call_is_replayed_only_after_every_envoy_applied_the_flip(
        start_stack: Any) -> None:
    stack: SplitStack = await start_stack("45s")  # ack_timeout: far more than the hold below
    answer, _ = await stack.call(b"warm")
    assert answer == f"{stack.replica}:warm".encode()
    await _hibernate(stack)

    stack.slow.hold_acks()
    sent_at = time.monotonic()
    call = asyncio.create_task(stack.call(b"cold"))
    flip: Response | None = None
    replica = ""

    async def flipped_but_held() -> bool:
        """The service is awake, the real Envoy routes to its replica, and the slow client
        holds the ACK of the very push that flips it there."""
        nonlocal flip, replica
        if call.done():
            raise AssertionError(
                f"the held call ended ({describe(call)}) while the slow Envoy held its "
                f"ACKs; slow client saw {stack.slow.responses[-3:]}\n{stack.logs()}")
        status = await stack.status()
        if status["state"] != "ACTIVE" or not status["ready_endpoints"]:
            return False
        replica = status["ready_endpoints"][0]
        if replica not in (await stack.envoy.cluster_hosts()).get(SERVICE, set()):
            return False
        held = stack.slow.held
        if held is None or held.type != "eds" or held.endpoints.get(SERVICE) != {replica}:
            return False
        flip = held
        return True

    try:
        await wait_until(flipped_but_held, 30, "the wake, the real Envoy's flip and the "
                         "slow client holding the flip's ACK", interval=0.05)
        assert flip is not None
        await asyncio.sleep(HOLD_AFTER_CONDITIONS)

        # Everything but the slow Envoy's ACK is done: the call must still be held.
        assert not call.done(), (f"the call ended ({describe(call)}) before the slow Envoy "
                                 f"applied the flip\n{stack.logs()}")
        assert stack.slow.held is flip and flip.acked_at is None
        table = {s["name"]: s for s in await asyncio.to_thread(status_json, stack.config)}
        assert table[SERVICE]["state"] == "ACTIVE"
        assert table[SERVICE]["ready_endpoints"] == [replica]
        assert (await stack.envoy.cluster_hosts())[SERVICE] == {replica}
        held_for = time.monotonic() - sent_at
        assert not call.done()
    except BaseException:
        call.cancel()
        raise
    finally:
        released_at = time.monotonic()
        stack.slow.release_acks()

    try:
        answer, completed_at = await asyncio.wait_for(call, 60)
    finally:
        call.cancel()  # a no-op once done; never leave it pending past the stack's end
    assert answer == f"{stack.replica}:cold".encode()
    assert flip is not None
    assert flip.acked_at is not None and flip.acked_at >= released_at
    assert completed_at > released_at, "the call completed before the ACKs were released"
    # Replayed by the real Envoy (the activator's retry marker), not answered by it.
    assert await stack.envoy.stat(f"cluster.{SERVICE}.upstream_rq_retry") >= 1
    activator_log = stack.activator.text()
    assert "activator.released" in activator_log
    assert "activator.flip_failed" not in activator_log
    assert "xds.push_incomplete" not in stack.control_plane.text()
    history = [h["to"] for h in (await stack.status())["history"]]
    assert history[-3:] == ["HIBERNATED", "WAKING", "ACTIVE"]
    print(f"held {held_for:.2f}s before the release; answered "
          f"{completed_at - released_at:.3f}s after it")


async def test_held_grpc_call_is_not_replayed_when_an_envoy_never_applies_the_flip(
        start_stack: Any) -> None:
    """The degraded path: the slow Envoy holds the flip's ACK past ack_timeout. The held
    call is answered UNAVAILABLE ("did not confirm its route"), not replayed, although the
    real Envoy routes to the replica; once the slow Envoy ACKs, calls go through."""
    stack: SplitStack = await start_stack("3s")
    await _hibernate(stack)

    stack.slow.hold_acks()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stack.call(b"cold", timeout=60)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE, failed.value
        assert "did not confirm its route" in (failed.value.details() or ""), failed.value
        held = stack.slow.held
        assert held is not None and held.type == "eds" and held.acked_at is None
        status = await stack.status()
        assert status["state"] == "ACTIVE" and held.endpoints.get(SERVICE) == set(
            status["ready_endpoints"])
        assert (await stack.envoy.cluster_hosts())[SERVICE] == set(status["ready_endpoints"])
        assert await stack.envoy.stat(f"cluster.{SERVICE}.upstream_rq_retry") == 0
        assert "activator.flip_failed" in stack.activator.text()
    finally:
        stack.slow.release_acks()

    answer, _ = await stack.call(b"again")
    assert answer == f"{stack.replica}:again".encode()
