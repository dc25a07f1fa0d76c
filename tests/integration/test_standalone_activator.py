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
import dataclasses
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
from tests.support.envoy import Envoy, stop_envoy
from tests.support.fleet import Proc
from tests.support.net import free_port, wait_until
from tests.support.up import processes_mentioning, status_json
from torpor import admin_client

pytestmark = pytest.mark.envoy

GRPC_ECHO = Path(__file__).resolve().parents[1] / "support" / "grpc_echo.py"
SERVICE = "grpcsvc"
HOST = "grpcsvc.localhost"
METHOD = "/torpor.test.Echo/Say"
#: How long the slow client keeps holding the ACK of the flip once everything else is
#: in place (the real Envoy routes to the ready replica): the call must still be pending.
HOLD_AFTER_CONDITIONS = 2.0


@dataclasses.dataclass
class Stack:
    """The processes of one test and the addresses they were given."""

    tmp: Path
    config: Path
    ports: dict[str, int]
    control_plane: Proc
    activator: Proc
    envoy: Envoy
    slow: AdsClient
    #: The replica's name (grpc_echo puts it in front of every answer), unique to this
    #: stack: its process is found by it, also while another test run is going on.
    replica: str

    @property
    def admin_api(self) -> str:
        return f"127.0.0.1:{self.ports['api']}"

    @property
    def activator_h2(self) -> str:
        return f"127.0.0.1:{self.ports['acth2']}"

    def status(self) -> dict[str, Any]:
        return admin_client.get_status(self.admin_api, SERVICE)

    async def call(self, payload: bytes, timeout: float = 90) -> tuple[bytes, float]:
        """One gRPC call through the real Envoy: (answer, monotonic time it completed)."""
        options = [("grpc.default_authority", HOST), ("grpc.enable_http_proxy", 0)]
        target = f"127.0.0.1:{self.ports['listen']}"
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            say = channel.unary_unary(METHOD)
            answer = await say(payload, timeout=timeout)
        return bytes(answer), time.monotonic()

    def logs(self) -> str:
        return (f"--- control plane:\n{self.control_plane.text()[-4000:]}\n"
                f"--- activator:\n{self.activator.text()[-4000:]}\n"
                f"--- envoy:\n{self.envoy.log_text()[-2000:]}")


    def replica_processes(self) -> list[str]:
        return processes_mentioning(f"--name {self.replica} ")


def write_config(tmp: Path, ack_timeout: str, replica: str) -> tuple[Path, dict[str, int]]:
    """One config for both processes: they agree on every address (the control plane
    routes sleeping services to activator.listen_h2; the activator calls admin_api)."""
    names = ("listen", "admin", "xds", "api", "metrics", "act", "actm", "acth2")
    p = {k: free_port() for k in names}
    text = f"""
gateway: {{listen: 127.0.0.1:{p['listen']}, admin: 127.0.0.1:{p['admin']}}}
control_plane: {{xds: 127.0.0.1:{p['xds']}, admin_api: 127.0.0.1:{p['api']},
                metrics: 127.0.0.1:{p['metrics']}, ack_timeout: {ack_timeout}}}
activator: {{listen: 127.0.0.1:{p['act']}, metrics: 127.0.0.1:{p['actm']},
            listen_h2: 127.0.0.1:{p['acth2']}, wake_timeout: 60s}}
store: {{kind: sqlite, path: ./state.db}}
workloads: {{kind: local}}
policy: {{idle_after: 1h, evict_after: 2h, check_every: 1s}}
services:
  - name: {SERVICE}
    host: {HOST}
    replicas: 1
    protocol: http2
    local:
      command: [{sys.executable}, {GRPC_ECHO}, --port, "{{port}}", --name, {replica},
                --load-seconds, "1"]
      ready_probe: tcp
      stop_grace: 5s
"""
    path = tmp / "torpor.yaml"
    path.write_text(text)
    return path, p


def _proc(tmp: Path, name: str, verb: str, config: Path) -> Proc:
    argv = [sys.executable, "-m", "assembly.cli", verb, "--config", str(config),
            "--log-level", "info"]
    return Proc(name, argv, tmp / f"{name}.log")


async def _wait_logged(proc: Proc, marker: str, timeout: float = 60) -> None:
    async def logged() -> bool:
        if not proc.alive:
            raise AssertionError(f"{proc.name} exited:\n{proc.text()[-3000:]}")
        return marker in proc.text()

    await wait_until(logged, timeout, f"{proc.name}: {marker}", interval=0.05)


@pytest.fixture
async def start_stack(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[Stack]]]:
    """start_stack(ack_timeout) starts `torpor xds-server`, the slow ADS client, `torpor
    activator` and a real Envoy, and waits until the service is ACTIVE behind Envoy.
    Everything it started is stopped at teardown, whatever happened."""
    stacks: list[Stack] = []

    async def start(ack_timeout: str) -> Stack:
        replica = f"standalone-echo-{uuid.uuid4().hex[:8]}"
        config, ports = write_config(tmp_path, ack_timeout, replica)
        stack = Stack(
            tmp_path, config, ports,
            control_plane=_proc(tmp_path, "xds-server", "xds-server", config),
            activator=_proc(tmp_path, "activator", "activator", config),
            envoy=Envoy(tmp_path, "real-envoy", ports["admin"], ports["xds"]),
            slow=AdsClient(f"127.0.0.1:{ports['xds']}", "slow-envoy"), replica=replica)
        stacks.append(stack)
        stack.control_plane.start()
        await _wait_logged(stack.control_plane, "control_plane.started")
        await stack.slow.start()
        stack.activator.start()  # its catalog mirror asks the control plane first
        await _wait_logged(stack.activator, "activator.h2.listening")
        stack.envoy.start()
        await stack.envoy.wait_ready()
        await _wait_serving(stack)
        return stack

    yield start
    problems = []
    left = []
    for stack in stacks:
        await stack.slow.stop()
        await stop_envoy(stack.envoy)
        for proc in (stack.activator, stack.control_plane):
            try:
                code = await proc.stop()
            finally:
                proc.kill()
            if code not in (0, None):
                problems.append(f"{proc.name}: exit {code}\n{proc.text()[-3000:]}")
        left += stack.replica_processes()
    assert not left, f"replicas left running: {left}"
    assert not problems, problems


async def _wait_serving(stack: Stack) -> None:
    """ACTIVE with a ready replica, in the real Envoy's cluster and in the slow client's."""
    async def serving() -> bool:
        status = await asyncio.to_thread(stack.status)
        if status["state"] != "ACTIVE" or not status["ready_endpoints"]:
            return False
        replica = status["ready_endpoints"][0]
        hosts = (await stack.envoy.cluster_hosts()).get(SERVICE, set())
        return hosts == {replica} and stack.slow.last_endpoints(SERVICE) == {replica}

    await wait_until(serving, 60, f"{SERVICE} served by its replica", interval=0.1)


async def _hibernate(stack: Stack) -> None:
    """`torpor hibernate` while every Envoy ACKs; then asleep everywhere."""
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "assembly.cli", "hibernate", SERVICE, "--config",
         str(stack.config)], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    status = await asyncio.to_thread(stack.status)
    assert status["state"] == "HIBERNATED" and not status["ready_endpoints"], status

    async def asleep() -> bool:
        hosts = (await stack.envoy.cluster_hosts()).get(SERVICE, set())
        return (hosts == {stack.activator_h2} and stack.slow.held is None
                and stack.slow.last_endpoints(SERVICE) == {stack.activator_h2}
                and not stack.replica_processes())

    await wait_until(asleep, 30, f"{SERVICE} routed to the activator everywhere, no replica",
                     interval=0.1)


def _describe(task: asyncio.Task[tuple[bytes, float]]) -> str:
    if not task.done():
        return "pending"
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return f"failed: {exc!r}" if exc is not None else f"answered {task.result()[0]!r}"


async def test_held_grpc_call_is_replayed_only_after_every_envoy_applied_the_flip(
        start_stack: Any) -> None:
    stack: Stack = await start_stack("45s")  # ack_timeout: far more than the hold below
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
                f"the held call ended ({_describe(call)}) while the slow Envoy held its "
                f"ACKs; slow client saw {stack.slow.responses[-3:]}\n{stack.logs()}")
        status = await asyncio.to_thread(stack.status)
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
        assert not call.done(), (f"the call ended ({_describe(call)}) before the slow Envoy "
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
    history = [h["to"] for h in (await asyncio.to_thread(stack.status))["history"]]
    assert history[-3:] == ["HIBERNATED", "WAKING", "ACTIVE"]
    print(f"held {held_for:.2f}s before the release; answered "
          f"{completed_at - released_at:.3f}s after it")


async def test_held_grpc_call_is_not_replayed_when_an_envoy_never_applies_the_flip(
        start_stack: Any) -> None:
    """The degraded path: the slow Envoy holds the flip's ACK past ack_timeout. The held
    call is answered UNAVAILABLE ("did not confirm its route"), not replayed, although the
    real Envoy routes to the replica; once the slow Envoy ACKs, calls go through."""
    stack: Stack = await start_stack("3s")
    await _hibernate(stack)

    stack.slow.hold_acks()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stack.call(b"cold", timeout=60)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE, failed.value
        assert "did not confirm its route" in (failed.value.details() or ""), failed.value
        held = stack.slow.held
        assert held is not None and held.type == "eds" and held.acked_at is None
        status = await asyncio.to_thread(stack.status)
        assert status["state"] == "ACTIVE" and held.endpoints.get(SERVICE) == set(
            status["ready_endpoints"])
        assert (await stack.envoy.cluster_hosts())[SERVICE] == set(status["ready_endpoints"])
        assert await stack.envoy.stat(f"cluster.{SERVICE}.upstream_rq_retry") == 0
        assert "activator.flip_failed" in stack.activator.text()
    finally:
        stack.slow.release_acks()

    answer, _ = await stack.call(b"again")
    assert answer == f"{stack.replica}:again".encode()
