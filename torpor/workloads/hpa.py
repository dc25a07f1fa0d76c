"""HorizontalPodAutoscalers of hibernated Deployments: what torpor does about them.

Kubernetes' HPA controller stops acting on a target whose replicas are 0 as long as its
minReplicas is at least 1 (condition ScalingActive=False, reason ScalingDisabled): then a
hibernation needs nothing but the scale to zero, and the HPA resumes once the wake scales
the Deployment up. With minReplicas 0 (the HPAScaleToZero feature gate) the HPA would
scale a hibernated Deployment back up on its own metrics, so torpor sets that minReplicas
aside: it records 0 in the HPA annotation torpor.io/recorded-min-replicas and sets
minReplicas to 1, which disables the HPA while the target sits at 0; the wake restores 0.

A wake restores the recorded count clamped into [minReplicas, maxReplicas], which is
where the HPA would move it anyway, so there is one scale instead of two.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torpor.logs import event
from torpor.workloads.annotations import RECORDED_MIN_REPLICAS
from torpor.workloads.kube_api import KubeCalls

log = logging.getLogger("torpor.kubernetes.hpa")


def targets(hpa: dict[str, Any], deployment: str) -> bool:
    """Whether `hpa` scales the Deployment named `deployment` (same namespace)."""
    ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
    return ref.get("kind") == "Deployment" and ref.get("name") == deployment


class HpaGuard:
    """Finds the HPA of a Deployment (from the reflector's copy) and adjusts it."""

    def __init__(self, calls: KubeCalls, hpas_of: Callable[[str], dict[str, dict[str, Any]]]):
        self._calls = calls
        self._hpas_of = hpas_of

    def find(self, namespace: str, deployment: str) -> str | None:
        """The name of the HPA targeting the Deployment, if any."""
        for hpa in self._hpas_of(namespace).values():
            if targets(hpa, deployment):
                return str(hpa["metadata"]["name"])
        return None

    async def before_zero(self, namespace: str, deployment: str) -> None:
        """Set a minReplicas of 0 aside, so the HPA cannot undo the hibernation."""
        hpa = await self._read(namespace, deployment)
        if hpa is None or int(hpa["spec"].get("minReplicas", 1)) != 0:
            return
        await self._patch(namespace, hpa, {"metadata": {"annotations": {
            RECORDED_MIN_REPLICAS: "0"}}, "spec": {"minReplicas": 1}})
        event(log, "kubernetes.hpa_set_aside", hpa=f"{namespace}/{hpa['metadata']['name']}",
              deployment=deployment, min_replicas=0)

    async def bounded(self, namespace: str, deployment: str, replicas: int) -> int:
        """`replicas` within the HPA's bounds (its own minReplicas, not the set-aside one)."""
        hpa = await self._read(namespace, deployment)
        if hpa is None:
            return replicas
        spec = hpa["spec"]
        low = max(1, int(spec.get("minReplicas", 1)))
        high = max(low, int(spec.get("maxReplicas", replicas)))
        bounded = min(max(replicas, low), high)
        if bounded != replicas:
            event(log, "kubernetes.hpa_bounds", deployment=f"{namespace}/{deployment}",
                  recorded=replicas, scaled=bounded, min_replicas=low, max_replicas=high)
        return bounded

    async def after_wake(self, namespace: str, deployment: str) -> None:
        """Give back a minReplicas that `before_zero` set aside."""
        hpa = await self._read(namespace, deployment)
        annotations = (hpa or {}).get("metadata", {}).get("annotations") or {}
        if hpa is None or RECORDED_MIN_REPLICAS not in annotations:
            return
        restored = int(annotations[RECORDED_MIN_REPLICAS])
        await self._patch(namespace, hpa, {"metadata": {"annotations": {
            RECORDED_MIN_REPLICAS: None}}, "spec": {"minReplicas": restored}})
        event(log, "kubernetes.hpa_restored", hpa=f"{namespace}/{hpa['metadata']['name']}",
              deployment=deployment, min_replicas=restored)

    async def _read(self, namespace: str, deployment: str) -> dict[str, Any] | None:
        """The HPA as the API server has it now (the reflector's copy may lag our own
        last write)."""
        name = self.find(namespace, deployment)
        if name is None:
            return None
        hpa: dict[str, Any] = await self._calls.call(
            f"read horizontalpodautoscalers {namespace}/{name}",
            self._calls.autoscaling.read_namespaced_horizontal_pod_autoscaler, name, namespace)
        return hpa if targets(hpa, deployment) else None

    async def _patch(self, namespace: str, hpa: dict[str, Any], body: dict[str, Any]) -> None:
        name = hpa["metadata"]["name"]
        await self._calls.call(
            f"patch horizontalpodautoscalers {namespace}/{name}",
            self._calls.autoscaling.patch_namespaced_horizontal_pod_autoscaler, name,
            namespace, body)
