"""The simulated cluster behind the fake API: controllers and a kubelet that runs real processes.

It reacts to store events (coalesced into one sync per loop turn) and ticks every second for
the HPA. Every write it makes goes through the same store calls the API uses, so clients see
ordinary resourceVersion bumps and watch events, and writes happen only when something changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import aiohttp

from .api import DEPLOYMENTS, HPAS, PODS, SERVICES, SLICES, ApiError, Event, Obj, Store, now

_log = logging.getLogger(__name__)
DESIRED_ANNOTATION = "fake.torpor.test/desired-replicas"
_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes uses for hashes and name suffixes
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def random_suffix(length: int = 5) -> str:
    return "".join(random.choices(_ALPHABET, k=length))


def template_hash(template: Obj) -> str:
    """A stable pod-template-hash, so pods of an older template can be told apart."""
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()
    return "".join(_ALPHABET[b % len(_ALPHABET)] for b in digest[:10])


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion; `$$` escapes and unknown references stay as written."""
    return _VAR.sub(lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


def is_ready(pod: Obj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def owned_by(obj: Obj, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def owner_ref(owner: Obj) -> Obj:
    meta = owner["metadata"]
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}


def condition(previous: list[Obj] | None, kind: str, status: str, reason: str, message: str,
              stamps: tuple[str, ...] = ("lastTransitionTime",)) -> Obj:
    """A condition keeping its timestamps while its status holds, so unchanged means no write."""
    old = next((c for c in previous or [] if c.get("type") == kind), None)
    keep = old is not None and old.get("status") == status
    made: Obj = {"type": kind, "status": status}
    for stamp in stamps:
        made[stamp] = old[stamp] if keep and old and stamp in old else now()
    return {**made, "reason": reason, "message": message}


def _name_key(obj: Obj) -> tuple[str, str]:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


class Cluster:
    """Garbage collector, Deployment, EndpointSlice and HPA controllers, and the kubelet."""

    def __init__(self, store: Store, *, probe_period: float, workdir: Path) -> None:
        self.store = store
        self.kubelet = Kubelet(store, probe_period, workdir)
        self._pending = False
        self._stopped = False
        self._ticker: asyncio.Task[None] | None = None
        # Deployment uid -> (generation, pod-template-hash): hashing every template on every
        # pass was most of a pass at 10,000 Deployments; a template change bumps generation.
        self._hashes: dict[str, tuple[int, str]] = {}
        store.listeners.append(self._on_event)

    def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def shutdown(self) -> None:
        self._stopped = True
        if self._ticker is not None:
            self._ticker.cancel()
        await self.kubelet.shutdown()

    def _on_event(self, _event: Event) -> None:
        if not self._pending and not self._stopped:
            self._pending = True
            asyncio.get_running_loop().call_soon(self._sync)

    async def _tick(self) -> None:
        """The HPA resyncs on a period even without events, like the real controller."""
        while True:
            await asyncio.sleep(1.0)
            self._on_event(Event(0, "", PODS, {}, None))

    def _sync(self) -> None:
        self._pending = False
        if self._stopped:
            return
        steps = (self._collect_garbage, self._sync_deployments, self._sync_slices,
                 self._sync_hpas, self.kubelet.sync)
        for step in steps:
            try:
                step()
            except (ApiError, KeyError, TypeError, ValueError):
                _log.exception("fake kube: %s failed", step.__name__)

    # garbage collector --------------------------------------------------------------------
    def _collect_garbage(self) -> None:
        """Background propagation: objects whose every owner is gone get deleted."""
        uids = self.store.all_uids()

        def orphan(obj: Obj) -> bool:
            owners = {ref.get("uid") for ref in obj["metadata"].get("ownerReferences") or []}
            return bool(owners) and not owners & uids \
                and "deletionTimestamp" not in obj["metadata"]

        for res in (PODS, SLICES, SERVICES, DEPLOYMENTS, HPAS):
            for obj in self.store.items(res, match=orphan):
                self.store.delete(res, *_name_key(obj))

    # deployments --------------------------------------------------------------------------
    def _sync_deployments(self) -> None:
        for deployment in self.store.items(DEPLOYMENTS, copied=False):  # read only
            namespace, uid = deployment["metadata"]["namespace"], deployment["metadata"]["uid"]
            # Match before the store copies: copying every pod per Deployment is quadratic
            # (a hundred Deployments took seconds per pass).
            def owned(p: Obj, uid: str = uid) -> bool:
                return owned_by(p, uid)

            self._scale_pods(deployment, self.store.items(PODS, namespace, owned))
            self._deployment_status(deployment, self.store.items(PODS, namespace, owned))

    def _scale_pods(self, deployment: Obj, owned: list[Obj]) -> None:
        """Create up to spec.replicas pods of the current template; drop the surplus, and the
        old template's pods once the new ones are ready (a rolling update with 100% surge)."""
        wanted, pod_hash = deployment["spec"]["replicas"], self._pod_hash(deployment)
        active = [p for p in owned if "deletionTimestamp" not in p["metadata"]]
        current = [p for p in active if p["metadata"]["labels"].get("pod-template-hash")
                   == pod_hash]
        for _ in range(wanted - len(current)):
            self.store.create(PODS, self._new_pod(deployment, pod_hash))
        # Like the ReplicaSet controller: not-ready pods go first, then the newest.
        ranked = sorted(current, key=lambda p: p["metadata"]["creationTimestamp"], reverse=True)
        ranked.sort(key=is_ready)
        doomed = ranked[:max(len(current) - wanted, 0)]
        if sum(is_ready(p) for p in current if p not in doomed) >= wanted:
            doomed += [p for p in active if p not in current]
        for pod in doomed:
            self.store.delete(PODS, *_name_key(pod))

    def _pod_hash(self, deployment: Obj) -> str:
        meta = deployment["metadata"]
        known = self._hashes.get(meta["uid"])
        if known is None or known[0] != meta["generation"]:
            known = (meta["generation"], template_hash(deployment["spec"]["template"]))
            self._hashes[meta["uid"]] = known
        return known[1]

    @staticmethod
    def _new_pod(deployment: Obj, pod_hash: str) -> Obj:
        template = copy.deepcopy(deployment["spec"]["template"])
        meta = template.get("metadata") or {}
        name = f"{deployment['metadata']['name']}-{pod_hash}-{random_suffix()}"
        pod_meta: Obj = {"name": name, "namespace": deployment["metadata"]["namespace"],
                         "labels": {**(meta.get("labels") or {}), "pod-template-hash": pod_hash},
                         "ownerReferences": [owner_ref(deployment)]}
        if meta.get("annotations"):
            pod_meta["annotations"] = meta["annotations"]
        return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta,
                "spec": template.get("spec") or {}}

    def _deployment_status(self, deployment: Obj, owned: list[Obj]) -> None:
        spec, meta = deployment["spec"], deployment["metadata"]
        pod_hash = self._pod_hash(deployment)
        active = [p for p in owned if "deletionTimestamp" not in p["metadata"]]
        ready = sum(is_ready(p) for p in active)
        updated = sum(p["metadata"]["labels"].get("pod-template-hash") == pod_hash
                      for p in active)
        counts = {"replicas": len(active), "updatedReplicas": updated, "readyReplicas": ready,
                  "availableReplicas": ready,
                  "unavailableReplicas": max(spec["replicas"] - ready, 0)}
        previous = (deployment.get("status") or {}).get("conditions")
        available, done = ready >= spec["replicas"], updated == len(active) == spec["replicas"]
        stamps = ("lastUpdateTime", "lastTransitionTime")
        replica_set = f'ReplicaSet "{meta["name"]}-{pod_hash}"'
        conditions = [
            condition(previous, "Available", str(available),
                      "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                      "Deployment has minimum availability." if available
                      else "Deployment does not have minimum availability.", stamps),
            condition(previous, "Progressing", "True",
                      "NewReplicaSetAvailable" if done else "ReplicaSetUpdated",
                      f"{replica_set} has successfully progressed." if done
                      else f"{replica_set} is progressing.", stamps)]
        status = {"observedGeneration": meta["generation"],
                  **{k: v for k, v in counts.items() if v}, "conditions": conditions}
        self.store.set_status(DEPLOYMENTS, *_name_key(deployment), status)

    # endpoint slices ----------------------------------------------------------------------
    def _sync_slices(self) -> None:
        for service in self.store.items(SERVICES):
            selector = service["spec"].get("selector")
            if selector:
                self._sync_slice(service, selector)

    def _sync_slice(self, service: Obj, selector: dict[str, str]) -> None:
        namespace, name = _name_key(service)
        pods = self.store.items(PODS, namespace, lambda p: all(
            (p["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items()))
        wanted = {"ports": _slice_ports(service, pods) or None,  # nil lists serialise as null
                  "endpoints": [_endpoint(p) for p in pods if p["status"].get("podIP")] or None}
        owned = self.store.items(SLICES, namespace,
                                 lambda s: owned_by(s, service["metadata"]["uid"]))
        if owned:
            if any(owned[0].get(k) != v for k, v in wanted.items()):
                self.store.replace(SLICES, {**owned[0], **wanted})
            return
        labels = {"kubernetes.io/service-name": name,
                  "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}
        self.store.create(SLICES, {
            "metadata": {"name": f"{name}-{random_suffix()}", "namespace": namespace,
                         "labels": labels, "ownerReferences": [owner_ref(service)]},
            "addressType": "IPv4", **wanted})

    # horizontal pod autoscalers -----------------------------------------------------------
    def _sync_hpas(self) -> None:
        for hpa in self.store.items(HPAS):
            self._sync_hpa(hpa)

    def _sync_hpa(self, hpa: Obj) -> None:
        """Upstream's rules, with an annotation standing in for the metrics pipeline."""
        spec, previous = hpa["spec"], hpa.get("status") or {}
        conditions, ref = previous.get("conditions"), spec.get("scaleTargetRef") or {}
        namespace = hpa["metadata"]["namespace"]
        target = None
        if (ref.get("apiVersion"), ref.get("kind")) == ("apps/v1", "Deployment"):
            target = self.store.get(DEPLOYMENTS, namespace, ref.get("name", ""))
        status: Obj = {"observedGeneration": hpa["metadata"]["generation"],
                       "desiredReplicas": previous.get("desiredReplicas", 0)}
        if "lastScaleTime" in previous:
            status["lastScaleTime"] = previous["lastScaleTime"]
        if target is None:
            status["conditions"] = [condition(
                conditions, "AbleToScale", "False", "FailedGetScale",
                f'the HPA controller was unable to get the target\'s current scale: deployments'
                f'.apps "{ref.get("name", "")}" not found')]
        else:
            status.update(self._autoscale(hpa, target, conditions))
        self.store.set_status(HPAS, namespace, hpa["metadata"]["name"], status)

    def _autoscale(self, hpa: Obj, target: Obj, conditions: list[Obj] | None) -> Obj:
        spec, current = hpa["spec"], target["spec"]["replicas"]
        low, high = spec.get("minReplicas", 1), spec["maxReplicas"]
        able = condition(conditions, "AbleToScale", "True", "ReadyForNewScale",
                         "recommended size matches current size")
        actual = (target.get("status") or {}).get("replicas", 0)
        out: Obj = {"currentReplicas": actual} if actual else {}
        if current == 0 and low != 0:
            limited = [c for c in conditions or [] if c.get("type") == "ScalingLimited"]
            return {**out, "desiredReplicas": 0, "conditions": [able, condition(
                conditions, "ScalingActive", "False", "ScalingDisabled",
                "scaling is disabled since the replica count of the target is zero"), *limited]}
        try:
            desired = int(hpa["metadata"].get("annotations", {})[DESIRED_ANNOTATION])
        except (KeyError, ValueError):
            desired = current
        clamped = min(max(desired, low), high)
        limited_c = condition(conditions, "ScalingLimited", "False", "DesiredWithinRange",
                              "the desired count is within the acceptable range")
        if clamped != desired:
            too_few = clamped > desired
            limited_c = condition(
                conditions, "ScalingLimited", "True",
                "TooFewReplicas" if too_few else "TooManyReplicas",
                f"the desired replica count is {'less' if too_few else 'more'} than the"
                f" {'minimum' if too_few else 'maximum'} replica count")
        if clamped != current:
            target["spec"]["replicas"] = clamped
            self.store.replace(DEPLOYMENTS, target)
            out["lastScaleTime"] = now()
            able = condition(conditions, "AbleToScale", "True", "SucceededRescale",
                             f"the HPA controller was able to update the target scale to"
                             f" {clamped}")
        active = condition(conditions, "ScalingActive", "True", "ValidMetricFound",
                           "the HPA was able to successfully calculate a replica count from"
                           " cpu resource utilization (percentage of request)")
        return {**out, "desiredReplicas": clamped, "conditions": [able, active, limited_c]}


def _slice_ports(service: Obj, pods: list[Obj]) -> list[Obj]:
    """Service ports with targetPort resolved (a named one through the pods' container ports)."""
    ports = []
    for port in service["spec"].get("ports") or []:
        target = port.get("targetPort", port.get("port"))
        if isinstance(target, str):
            target = next((cp["containerPort"] for pod in pods
                           for container in pod["spec"].get("containers") or []
                           for cp in container.get("ports") or [] if cp.get("name") == target),
                          None)
        if target is not None:
            ports.append({"name": port.get("name", ""), "protocol": port.get("protocol", "TCP"),
                          "port": target})
    return ports


def _endpoint(pod: Obj) -> Obj:
    ready, terminating = is_ready(pod), "deletionTimestamp" in pod["metadata"]
    meta = pod["metadata"]
    return {"addresses": [pod["status"]["podIP"]],
            "conditions": {"ready": ready and not terminating, "serving": ready,
                           "terminating": terminating},
            "targetRef": {"kind": "Pod", "name": meta["name"], "namespace": meta["namespace"],
                          "uid": meta["uid"]},
            "nodeName": "fake-node"}


# ---------------------------------------------------------------------------------------
# Kubelet
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class PodRuntime:
    """What the kubelet knows about one pod's (first) container."""

    namespace: str
    name: str
    uid: str
    ip: str
    created: str = dataclasses.field(default_factory=now)
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    ready: bool = False
    ready_since: str = dataclasses.field(default_factory=now)
    started_at: str = ""
    started_mono: float = 0.0
    first_start: str = ""
    last_exit: Obj | None = None
    waiting: tuple[str, str] = ("ContainerCreating", "")
    next_start: float = 0.0
    task: asyncio.Task[None] | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def set_ready(self, ready: bool) -> None:
        if ready != self.ready:
            self.ready, self.ready_since = ready, now()


class Kubelet:
    """One task per pod: start the process, restart it, probe it, report, and terminate it."""

    def __init__(self, store: Store, probe_period: float, workdir: Path) -> None:
        self.store, self.period, self.workdir = store, probe_period, workdir
        self.pods: dict[str, PodRuntime] = {}
        self.spawned: list[subprocess.Popen[bytes]] = []
        self.stopping = False
        # A random loopback block per fake, so two fakes in one session never collide.
        self._block = (random.randint(100, 250), random.randint(0, 255))
        self._allocated = 0
        self._session: aiohttp.ClientSession | None = None

    def _allocate_ip(self) -> str:
        n, (a, b) = self._allocated, self._block
        self._allocated += 1
        return f"127.{a}.{(b + n // 254) % 256}.{1 + n % 254}"

    def processes(self, namespace: str | None = None) -> dict[str, int]:
        return {rt.name: rt.proc.pid for rt in list(self.pods.values())
                if rt.proc is not None and rt.alive() and namespace in (None, rt.namespace)}

    def sync(self) -> None:
        """Adopt every pod the kubelet has not seen yet (all pods are bound to our one node)."""
        if self.stopping:
            return
        for pod in self.store.items(PODS, match=lambda p: p["metadata"]["uid"] not in self.pods):
            uid = pod["metadata"]["uid"]
            if uid not in self.pods:
                runtime = PodRuntime(*_name_key(pod), uid, self._allocate_ip())
                self.pods[uid] = runtime
                runtime.task = asyncio.get_running_loop().create_task(self._run(runtime))

    async def _run(self, rt: PodRuntime) -> None:
        try:
            while True:
                pod = self.store.get(PODS, rt.namespace, rt.name)
                if pod is None or pod["metadata"]["uid"] != rt.uid:
                    return  # force-deleted: the finally kills at once
                if "deletionTimestamp" in pod["metadata"]:
                    await self._terminate(rt, pod["metadata"].get("deletionGracePeriodSeconds", 30))
                    with contextlib.suppress(ApiError):
                        self.store.remove(PODS, rt.namespace, rt.name, rt.uid)
                    return
                container = pod["spec"]["containers"][0]
                self._supervise(rt, pod, container)
                await self._probe(rt, container)
                self.store.set_status(PODS, rt.namespace, rt.name, self._status(rt, container))
                await asyncio.sleep(self.period)
        except (ApiError, KeyError, IndexError, TypeError, ValueError):
            _log.exception("fake kubelet: pod %s/%s failed", rt.namespace, rt.name)
        finally:
            _signal(rt.proc, signal.SIGKILL)
            self.pods.pop(rt.uid, None)

    def _supervise(self, rt: PodRuntime, pod: Obj, container: Obj) -> None:
        """Notice an exit (not ready, back off) and (re)start the process when due."""
        if rt.proc is not None and rt.proc.poll() is not None:
            code = rt.proc.returncode
            rt.last_exit = {"terminated": {
                "exitCode": code, "reason": "Completed" if code == 0 else "Error",
                "startedAt": rt.started_at, "finishedAt": now()}}
            rt.proc, rt.waiting = None, ("CrashLoopBackOff", "back-off restarting failed container")
            rt.next_start = time.monotonic() + min(0.5 * 2**rt.restarts, 5.0)
            rt.set_ready(False)
        if rt.proc is None and not self.stopping and time.monotonic() >= rt.next_start:
            self._start(rt, pod, container)

    def _start(self, rt: PodRuntime, pod: Obj, container: Obj) -> None:
        env = self._env(rt, pod, container)
        argv = [expand(a, env) for a in (container.get("command") or [])
                + (container.get("args") or [])]
        rt.next_start = time.monotonic() + 5.0  # if this start fails
        if not container.get("command"):
            rt.waiting = ("CreateContainerError", "the fake kubelet runs `command`; none given")
            return
        try:
            with (self.workdir / f"{rt.namespace}_{rt.name}.log").open("ab") as log:
                proc = subprocess.Popen(
                    argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, cwd=container.get("workingDir"),
                    start_new_session=True)  # its own group: killpg reaches its children
        except OSError as err:
            rt.waiting = ("RunContainerError", str(err))
            return
        self.spawned.append(proc)
        if rt.first_start:
            rt.restarts += 1
        rt.proc, rt.started_at, rt.started_mono = proc, now(), time.monotonic()
        rt.first_start = rt.first_start or rt.started_at

    @staticmethod
    def _env(rt: PodRuntime, pod: Obj, container: Obj) -> dict[str, str]:
        fields = {"status.podIP": rt.ip, "status.podIPs": rt.ip, "metadata.name": rt.name,
                  "metadata.namespace": rt.namespace, "metadata.uid": rt.uid,
                  "spec.nodeName": "fake-node", "status.hostIP": "127.0.0.1",
                  "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default")}
        env: dict[str, str] = {}
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = expand(str(var["value"]), env)
            elif path := ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath"):
                env[var["name"]] = fields.get(path, "")
        return env

    async def _probe(self, rt: PodRuntime, container: Obj) -> None:
        probe = container.get("readinessProbe")
        if not rt.alive() or (probe and time.monotonic() - rt.started_mono
                              < probe.get("initialDelaySeconds", 0)):
            ok = False
        elif probe and "httpGet" in probe:
            ok = await self._http_ok(rt, container, probe["httpGet"])
        elif probe and "tcpSocket" in probe:
            ok = await _tcp_ok(probe["tcpSocket"].get("host") or rt.ip,
                               _port(container, probe["tcpSocket"].get("port")))
        else:
            ok = True  # no probe (or exec, which the fake does not run): ready once running
        rt.set_ready(ok and rt.alive())

    async def _http_ok(self, rt: PodRuntime, container: Obj, action: Obj) -> bool:
        if self._session is None:  # no keep-alive, like the kubelet's prober
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        url = (f"{action.get('scheme', 'HTTP').lower()}://{action.get('host') or rt.ip}:"
               f"{_port(container, action.get('port'))}{action.get('path', '/')}")
        headers = {h["name"]: h["value"] for h in action.get("httpHeaders") or []}
        try:
            async with self._session.get(url, headers=headers, allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=1.0)) as response:
                return 200 <= response.status < 400
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    @staticmethod
    def _status(rt: PodRuntime, container: Obj) -> Obj:
        image = container.get("image", "")
        state: Obj = {"waiting": {"reason": rt.waiting[0], **(
            {"message": rt.waiting[1]} if rt.waiting[1] else {})}}
        if rt.proc is not None and rt.alive():
            state = {"running": {"startedAt": rt.started_at}}
        cstatus: Obj = {"name": container["name"], "image": image, "imageID": f"fake://{image}",
                        "ready": rt.ready, "started": rt.alive(), "restartCount": rt.restarts,
                        "state": state}
        if rt.proc is not None:
            cstatus["containerID"] = f"fake://{rt.proc.pid}"
        if rt.last_exit:
            cstatus["lastState"] = rt.last_exit
        unready = {} if rt.ready else {"reason": "ContainersNotReady",
                                       "message": f"containers with unready status:"
                                                  f" [{container['name']}]"}
        conditions = [
            {"type": "Initialized", "status": "True", "lastTransitionTime": rt.created},
            {"type": "Ready", "status": str(rt.ready), "lastTransitionTime": rt.ready_since,
             **unready},
            {"type": "ContainersReady", "status": str(rt.ready),
             "lastTransitionTime": rt.ready_since, **unready},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": rt.created}]
        status: Obj = {"phase": "Running" if rt.first_start else "Pending",
                       "conditions": conditions, "hostIP": "127.0.0.1",
                       "hostIPs": [{"ip": "127.0.0.1"}], "podIP": rt.ip, "podIPs": [{"ip": rt.ip}],
                       "qosClass": "BestEffort", "containerStatuses": [cstatus]}
        if rt.first_start:
            status["startTime"] = rt.first_start
        return status

    async def _terminate(self, rt: PodRuntime, grace: int) -> None:
        """SIGTERM, then SIGKILL once the grace period is over; done when the process is."""
        _signal(rt.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while rt.alive():
            if time.monotonic() >= deadline:
                _signal(rt.proc, signal.SIGKILL)
            await asyncio.sleep(0.05)

    async def shutdown(self) -> None:
        """SIGTERM every pod process, SIGKILL what is left after 5 s, then end the pod tasks."""
        self.stopping = True
        for proc in self.spawned:
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while any(p.poll() is None for p in self.spawned) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        tasks = [rt.task for rt in list(self.pods.values()) if rt.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.kill_all()
        if self._session is not None:
            await self._session.close()

    def kill_all(self) -> None:
        """SIGKILL and reap everything ever started; safe to call from any thread, repeatedly."""
        for proc in self.spawned:
            _signal(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def _signal(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _port(container: Obj, port: object) -> int:
    """A probe port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    for declared in container.get("ports") or []:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    return int(port) if isinstance(port, str) and port.isdigit() else 0


async def _tcp_ok(host: str, port: int) -> bool:
    try:
        async with asyncio.timeout(1.0):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True
