"""Fleet mode, HTTP/2: a standalone `torpor activator` that wakes a gRPC service ITSELF
(etcd store + Kubernetes workloads: the etcd wake lock, WAKING/ACTIVE written to etcd, the
scale-up patched on the fake Kubernetes API) holds the call until every Envoy of the
control plane applied the flip back to the pod.

Processes: a real etcd, the fake Kubernetes API (its kubelet runs the pods: a gRPC echo on
the pod's own loopback IP, tests/support/grpc_pod.py), one `torpor xds-server`, one `torpor
activator`, one real Envoy, and a second, slow "Envoy": a raw ADS client on the same control
plane that can hold its ACKs (tests/support/ads_client.py).

Why this mode: here nothing but the activator's route confirmation (WaitRouted on the
control plane: AdminRouteConfirmation → EnvoyRouting.wait_routed) stands between "the pod
is ready, ACTIVE is in etcd" and "503 + x-torpor-retry, replay". The control plane learns of
the wake through its etcd watch and pushes the flip; the activator's own wake never waits
for that push (unlike the admin Wake RPC a sqlite/local activator calls,
tests/integration/test_standalone_activator.py). An activator whose confirmation returns at
once answers "replay" while the slow Envoy still holds the flip's ACK, and this test fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.ads_client import AdsClient, Response
from tests.support.envoy import Envoy
from tests.support.etcd import EtcdServer
from tests.support.fake_kube import FakeKube
from tests.support.fleet import NS
from tests.support.grpc_pod import grpc_deployment, grpc_service, grpc_service_yaml
from tests.support.net import wait_until
from tests.support.split_stack import SERVICE, SplitStack, describe, split_config, torpor_proc
from torpor import admin_client

pytestmark = pytest.mark.envoy

#: How the activator is started (argv before its verb). A proof that the test tells a
#: confirming activator from one that does not confirm replaces this, from outside.
ACTIVATOR_COMMAND = [sys.executable, "-m", "assembly.cli"]
#: How long the slow client keeps holding the flip's ACK once everything else is in place
#: (ACTIVE, a ready pod, the real Envoy routing to it): the call must still be pending.
HOLD_AFTER_CONDITIONS = 2.0
#: Generous deadlines: other test runs may share the CPU.
DEADLINE = 90.0


@dataclasses.dataclass
class Stack(SplitStack):
    """The split stack on etcd and the fake Kubernetes API; its replicas are pods."""

    noun = "pod"

    etcd: EtcdServer
    kube: FakeKube

    async def record(self) -> dict[str, Any]:
        value = await self.etcd.get(f"/torpor/services/{SERVICE}")
        return {} if value is None else dict(json.loads(value))

    def scale_patches(self) -> int:
        return self.kube.count("patch", "deployments", "scale", SERVICE)


def write_config(tmp: Path, etcd: EtcdServer) -> tuple[Path, dict[str, int]]:
    """etcd store, Kubernetes workloads (each process names itself with --member). The
    control plane's ack_timeout is far longer than the test holds an ACK, so that only the
    slow Envoy's release ends the wait."""
    store = f'{{kind: etcd, endpoints: ["{etcd.endpoint}"], lease_ttl: 5s, timeout: 2s}}'
    workloads = ("{kind: kubernetes, kubeconfig: ./kubeconfig, poll_every: 1s, "
                 f"discover: false, namespaces: [{NS}]}}")
    return split_config(tmp, store=store, workloads=workloads,
                        services=grpc_service_yaml(SERVICE, NS),
                        control_plane_extra="ack_timeout: 60s",
                        activator_extra="wake_timeout: 80s")


@pytest.fixture
async def stack(tmp_path: Path, etcd: EtcdServer, kube: FakeKube) -> AsyncIterator[Stack]:
    """The service's Deployment (one pod) on the fake API, then `torpor xds-server`, the
    slow ADS client, `torpor activator` and a real Envoy; ready once the pod serves behind
    both "Envoys". Everything it started is stopped at teardown, whatever happened (the
    pods by the kube fixture, etcd by the etcd fixture)."""
    replica = f"fleet-grpc-{uuid.uuid4().hex[:8]}"
    kube.write_kubeconfig(tmp_path / "kubeconfig")
    kube.create(grpc_deployment(SERVICE, NS, replicas=1, answer_name=replica,
                                load_seconds=1.0))
    kube.create(grpc_service(SERVICE, NS))
    config, ports = write_config(tmp_path, etcd)
    stack = Stack(
        tmp_path, config, ports,
        control_plane=torpor_proc(tmp_path, "xds-server", config, "--member", "cp0"),
        activator=torpor_proc(tmp_path, "activator", config, "--member", "a0",
                              "--advertise", "127.0.0.1", command=ACTIVATOR_COMMAND),
        envoy=Envoy(tmp_path, "real-envoy", ports["admin"], ports["xds"]),
        slow=AdsClient(f"127.0.0.1:{ports['xds']}", "slow-envoy"), replica=replica,
        etcd=etcd, kube=kube)

    async def registered() -> bool:
        if not stack.activator.alive:
            raise AssertionError(f"activator exited:\n{stack.activator.text()[-3000:]}")
        return await etcd.get("/torpor/activators/a0") is not None

    async def activator_up() -> None:
        await wait_until(registered, DEADLINE, "the activator registered in etcd",
                         interval=0.1)

    try:
        await asyncio.to_thread(kube.wait_for, lambda: len(kube.pod_processes(NS)) == 1,
                                DEADLINE, "the service's pod running")
        await stack.start(activator_up, timeout=DEADLINE, envoy_timeout=DEADLINE)
        yield stack
    finally:
        problems = await stack.stop()
    assert not problems, problems


async def _hibernate(stack: Stack) -> None:
    """Hibernate through the control plane while every Envoy ACKs; then asleep everywhere:
    both "Envoys" send the service to the activator, and no pod is left."""
    status = await asyncio.to_thread(admin_client.hibernate, stack.admin_api, SERVICE,
                                     DEADLINE + 60)
    assert status["state"] == "HIBERNATED", status

    async def asleep() -> bool:
        # The pod goes after the answer (terminating, then gone from the EndpointSlice the
        # control plane watches): wait for that too.
        if (await stack.status())["ready_endpoints"]:
            return False
        hosts = (await stack.envoy.cluster_hosts()).get(SERVICE, set())
        return (hosts == {stack.activator_h2} and stack.slow.held is None
                and stack.slow.last_endpoints(SERVICE) == {stack.activator_h2}
                and not stack.kube.pod_processes(NS) and not stack.replica_processes())

    await wait_until(asleep, DEADLINE, f"{SERVICE} routed to the activator everywhere, "
                     "no pod", interval=0.1)
    assert (await stack.record())["state"] == "HIBERNATED"


async def test_fleet_activator_replays_a_grpc_call_only_after_every_envoy_applied_the_flip(
        stack: Stack) -> None:
    answer, _ = await stack.call(b"warm")
    assert answer == f"{stack.replica}:warm".encode()
    await _hibernate(stack)
    patches_before = stack.scale_patches()

    stack.slow.hold_acks()
    sent_at = time.monotonic()
    call = asyncio.create_task(stack.call(b"cold"))
    flip: Response | None = None
    pod = ""

    async def flipped_but_held() -> bool:
        """Woken (ACTIVE in etcd, a ready pod), the real Envoy routes to the pod, and the
        slow client holds the ACK of the very push that flips it there."""
        nonlocal flip, pod
        if call.done():
            raise AssertionError(
                f"the held call ended ({describe(call)}) while the slow Envoy held its "
                f"ACKs; slow client saw {stack.slow.responses[-3:]}\n{stack.logs()}")
        if (await stack.record()).get("state") != "ACTIVE":
            return False
        status = await stack.status()
        if status["state"] != "ACTIVE" or not status["ready_endpoints"]:
            return False
        pod = status["ready_endpoints"][0]
        if pod not in (await stack.envoy.cluster_hosts()).get(SERVICE, set()):
            return False
        held = stack.slow.held
        if held is None or held.type != "eds" or held.endpoints.get(SERVICE) != {pod}:
            return False
        flip = held
        return True

    try:
        await wait_until(flipped_but_held, DEADLINE, "the activator's wake, the real Envoy's "
                         "flip and the slow client holding the flip's ACK", interval=0.05)
        assert flip is not None
        await asyncio.sleep(HOLD_AFTER_CONDITIONS)

        # Everything but the slow Envoy's ACK is done: the call must still be held.
        assert not call.done(), (f"the call ended ({describe(call)}) before the slow Envoy "
                                 f"applied the flip\n{stack.logs()}")
        assert stack.slow.held is flip and flip.acked_at is None
        record = await stack.record()
        assert record["state"] == "ACTIVE", record
        status = await stack.status()
        assert status["state"] == "ACTIVE" and status["ready_endpoints"] == [pod], status
        assert (await stack.envoy.cluster_hosts())[SERVICE] == {pod}
        held_for = time.monotonic() - sent_at
        assert not call.done()
    except BaseException:
        call.cancel()
        raise
    finally:
        released_at = time.monotonic()
        stack.slow.release_acks()

    try:
        answer, completed_at = await asyncio.wait_for(call, DEADLINE)
    finally:
        call.cancel()  # a no-op once done; never leave it pending past the stack's end
    assert answer == f"{stack.replica}:cold".encode()
    assert flip is not None
    assert flip.acked_at is not None and flip.acked_at >= released_at
    assert completed_at > released_at, "the call completed before the ACKs were released"
    # Replayed by the real Envoy (the activator's retry marker), not answered by it.
    assert await stack.envoy.stat(f"cluster.{SERVICE}.upstream_rq_retry") >= 1
    # The fleet path: the activator woke the service itself (its Waker scaled the
    # Deployment once, under the etcd lock); the control plane only saw it through etcd.
    activator_log = stack.activator.text()
    assert "wake.scaling" in activator_log and "activator.released" in activator_log
    assert "activator.flip_failed" not in activator_log
    control_plane_log = stack.control_plane.text()
    assert "wake.scaling" not in control_plane_log
    assert "xds.push_incomplete" not in control_plane_log
    assert stack.scale_patches() - patches_before == 1
    record = await stack.record()
    assert [h["to"] for h in record["history"]][-3:] == ["HIBERNATED", "WAKING", "ACTIVE"]
    print(f"\nheld {held_for:.2f}s before the release; answered "
          f"{completed_at - released_at:.3f}s after it")
