"""The API-server half of the fake: object store, watch history, patches and the HTTP routes.

Everything here runs on the fake's own event loop, so the store needs no locks: every write
is one synchronous step that bumps the global resourceVersion, records the event for later
watches, pushes it to open watches and tells the simulated cluster (cluster.py).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import re
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

from aiohttp import web

Obj = dict[str, Any]
Matcher = Callable[[Obj], bool]


@dataclasses.dataclass(frozen=True)
class Resource:
    """One served resource; names come from the real API so error messages read the same."""

    group: str
    version: str
    plural: str
    kind: str
    has_status: bool = True
    tracks_generation: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """`deployments.apps`: how the real API names a resource in NotFound/Conflict."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        """`Deployment.apps`: how the real API names a kind in Invalid messages."""
        return f"{self.kind}.{self.group}" if self.group else self.kind


PODS = Resource("", "v1", "pods", "Pod")
SERVICES = Resource("", "v1", "services", "Service")
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment", tracks_generation=True)
SLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", has_status=False)
HPAS = Resource("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler",
                tracks_generation=True)
RESOURCES = (PODS, SERVICES, DEPLOYMENTS, SLICES, HPAS)


def resource_for(api_version: str, kind: str) -> Resource:
    """The resource that stores `kind` (seeding goes by apiVersion/kind like a manifest)."""
    for res in RESOURCES:
        if (res.api_version, res.kind) == (api_version, kind):
            return res
    raise ValueError(f"the fake does not serve {api_version} {kind}")


def now() -> str:
    """RFC 3339 with a Z, to the second, as the API serialises metav1.Time."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------
# Errors: the Status body the client parses
# ---------------------------------------------------------------------------------------

REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
           405: "MethodNotAllowed", 409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType",
           422: "Invalid", 429: "TooManyRequests", 500: "InternalError",
           503: "ServiceUnavailable", 504: "Timeout"}  # fmt: skip


class ApiError(Exception):
    """An error the API answers as a `kind: Status` body with the same HTTP code."""

    def __init__(self, code: int, message: str, reason: str | None = None,
                 details: Obj | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details
        self.reason = reason or REASONS.get(code, "Unknown")
        self.headers = headers or {}

    def body(self) -> Obj:
        status: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                       "status": "Failure", "message": self.message, "reason": self.reason}
        if self.details is not None:
            status["details"] = self.details
        status["code"] = self.code
        return status


def _details(res: Resource, name: str | None, **extra: Any) -> Obj:
    found = {"name": name, "group": res.group, "kind": res.plural, **extra}
    return {k: v for k, v in found.items() if v}


def not_found(res: Resource, name: str) -> ApiError:
    return ApiError(404, f'{res.qualified} "{name}" not found', details=_details(res, name))


def conflict(res: Resource, name: str) -> ApiError:
    message = (f'Operation cannot be fulfilled on {res.qualified} "{name}": the object has been'
               " modified; please apply your changes to the latest version and try again")
    return ApiError(409, message, details=_details(res, name))


def invalid(res_kind: str, group: str, name: str, errors: list[tuple[str, Any, str]]) -> ApiError:
    """422 Invalid; `errors` are (field, value, detail) where value None means Required."""
    texts, causes = [], []
    for field, value, detail in errors:
        what = "Required value" if value is None else f"Invalid value: {json.dumps(value)}"
        texts.append(f"{field}: {what}" + (f": {detail}" if detail else ""))
        causes.append({"reason": "FieldValueRequired" if value is None else "FieldValueInvalid",
                       "message": texts[-1].split(": ", 1)[1], "field": field})
    joined = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    kind = f"{res_kind}.{group}" if group else res_kind
    details = {"name": name, "group": group, "kind": res_kind, "causes": causes}
    return ApiError(422, f'{kind} "{name}" is invalid: {joined}',
                    details={k: v for k, v in details.items() if v})


# ---------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------

_SET_TERM = re.compile(r"^([^\s!=(),]+)\s+(in|notin)\s+\(([^)]*)\)$")
_KEY = re.compile(r"^([a-z0-9A-Z.\-]+/)?[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?$")


def _split_terms(selector: str) -> list[str]:
    """Split on commas that are not inside `in (...)` value sets."""
    terms, depth, start = [], 0, 0
    for i, char in enumerate(selector + ","):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(selector[start:i].strip())
            start = i + 1
    return [term for term in terms if term]


def _label_requirement(term: str) -> Callable[[dict[str, str]], bool]:
    if match := _SET_TERM.match(term):
        key, op, values = match[1], match[2], {v.strip() for v in match[3].split(",")}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    for op in ("!=", "==", "="):
        if op in term:
            key, value = (part.strip() for part in term.split(op, 1))
            if not _KEY.match(key):
                break
            if op == "!=":
                return lambda labels: labels.get(key) != value
            return lambda labels: labels.get(key) == value
    else:
        key = term[1:].strip() if term.startswith("!") else term
        if _KEY.match(key):
            if term.startswith("!"):
                return lambda labels: key not in labels
            return lambda labels: key in labels
    raise ApiError(400, f"unable to parse requirement: found '{term}', expected: identifier")


def label_matcher(selector: str) -> Callable[[dict[str, str]], bool]:
    """A labelSelector query string (equality and set-based) as a predicate over labels."""
    requirements = [_label_requirement(term) for term in _split_terms(selector)]
    return lambda labels: all(req(labels) for req in requirements)


def selector_string(selector: Obj | None) -> str:
    """A LabelSelector object in query syntax (Scale.status.selector, matching pods)."""
    selector = selector or {}
    terms = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], ",".join(expr.get("values") or [])
        terms.append({"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})",
                      "Exists": key, "DoesNotExist": f"!{key}"}[op])
    return ",".join(terms)


def field_matcher(selector: str) -> Matcher:
    """fieldSelector `metadata.name` / `metadata.namespace` with `=`, `==` or `!=`."""
    checks: list[Matcher] = []
    for term in _split_terms(selector):
        path, value = (p.strip() for p in re.split(r"!=|==|=", term, maxsplit=1))
        if path not in ("metadata.name", "metadata.namespace"):
            raise ApiError(400, f'"{path}" is not a known field selector: only "metadata.name",'
                                ' "metadata.namespace"')
        field, negate = path.split(".")[1], "!=" in term
        checks.append(lambda o, f=field, v=value, n=negate: (o["metadata"][f] == v) != n)
    return lambda obj: all(check(obj) for check in checks)


def query_matcher(query: dict[str, str]) -> Matcher:
    labels = label_matcher(query.get("labelSelector", ""))
    fields = field_matcher(query.get("fieldSelector", ""))
    return lambda obj: labels(obj["metadata"].get("labels") or {}) and fields(obj)


# ---------------------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any, *, strategic: bool = False) -> Any:
    """RFC 7386; `strategic` also merges lists of named maps by name (containers, ports, env)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if strategic and key.startswith("$"):
            continue  # directives such as $setElementOrder: order is not modelled
        if value is None:
            result.pop(key, None)
        elif strategic and _named_list(value) and _named_list(result.get(key)):
            result[key] = _merge_by_name(result[key], value)
        else:
            result[key] = merge_patch(result.get(key), value, strategic=strategic)
    return result


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, dict) and "name" in i for i in value)


def _merge_by_name(current: list[Obj], patch: list[Obj]) -> list[Obj]:
    merged = list(current)
    for item in patch:
        index = next((i for i, old in enumerate(merged) if old["name"] == item["name"]), None)
        if item.get("$patch") == "delete":
            merged = [old for old in merged if old["name"] != item["name"]]
        elif index is None:
            merged.append(merge_patch({}, item, strategic=True))
        else:
            merged[index] = merge_patch(merged[index], item, strategic=True)
    return merged


def _pointer(doc: Any, path: str) -> tuple[Any, str | int]:
    """The container holding the last token of a JSON pointer, and that token."""
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]
    if not tokens:
        raise ValueError("the root of the document cannot be patched")
    for token in tokens[:-1]:
        doc = doc[int(token)] if isinstance(doc, list) else doc[token]
    last = tokens[-1]
    if isinstance(doc, list):
        return doc, len(doc) if last == "-" else int(last)
    return doc, last


def _json_patch_op(doc: Obj, op: Obj) -> None:
    name = op.get("op")
    parent, key = _pointer(doc, op["path"])
    if name == "test":
        if parent[key] != op.get("value"):
            raise ValueError(f"testing value {op['path']} failed: test failed")
    elif name == "remove":
        del parent[key]
    elif name == "replace":
        _ = parent[key]  # replace needs the member to exist
        parent[key] = op["value"]
    elif name == "add" and isinstance(parent, list):
        parent.insert(int(key), op["value"])
    elif name == "add":
        parent[key] = op["value"]
    else:
        raise ValueError(f"unexpected kind of operation: {name}")


def json_patch(doc: Obj, ops: Any) -> Obj:
    """RFC 6902; any failed operation is 422 Invalid, as the real server answers."""
    if not isinstance(ops, list):
        raise ApiError(400, "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    result = copy.deepcopy(doc)
    try:
        for op in ops:
            _json_patch_op(result, op)
    except (KeyError, IndexError, ValueError, TypeError) as err:
        message = str(err) if isinstance(err, ValueError) else f"path not found: {err}"
        raise ApiError(422, "the server rejected our request due to an error in our request",
                       details={"causes": [{"reason": "UnexpectedServerResponse",
                                            "message": message}]}) from err
    return result


PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json",
               "application/strategic-merge-patch+json")


def apply_patch(content_type: str, current: Obj, patch: Any) -> Obj:
    """Dispatch on Content-Type like the real server (server-side apply is not served)."""
    if content_type == PATCH_TYPES[0]:
        return json_patch(current, patch)
    if content_type in PATCH_TYPES[1:]:
        if not isinstance(patch, dict):
            raise ApiError(400, "json: cannot unmarshal array into Go value of type map")
        return merge_patch(current, patch, strategic=content_type == PATCH_TYPES[2])
    message = ("the body of the request was in an unknown format - accepted media types include:"
               " " + ", ".join(PATCH_TYPES) + ", application/apply-patch+yaml")
    raise ApiError(415, message)


# ---------------------------------------------------------------------------------------
# Defaults and validation (only what a client of ours can trip over)
# ---------------------------------------------------------------------------------------

_HPA_METRICS = [{"type": "Resource", "resource": {
    "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}]


def apply_defaults(res: Resource, obj: Obj) -> None:
    """The defaults a client reads back after a create (a read-modify-write sees them too)."""
    spec = obj.setdefault("spec", {})
    if res is DEPLOYMENTS:
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        spec.setdefault("strategy", {"type": "RollingUpdate", "rollingUpdate": {
            "maxSurge": "25%", "maxUnavailable": "25%"}})
        _default_pod_spec(spec.setdefault("template", {}).setdefault("spec", {}))
    elif res is PODS:
        _default_pod_spec(spec)
        spec.setdefault("nodeName", "fake-node")  # bound at once, as if scheduled
    elif res is SERVICES:
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for port in spec.get("ports") or []:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
    elif res is HPAS:
        spec.setdefault("minReplicas", 1)
        spec.setdefault("metrics", copy.deepcopy(_HPA_METRICS))


def _default_pod_spec(spec: Obj) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")


def check_decodable(res: Resource, obj: Any) -> None:
    """400 where Go's JSON decoding would fail: label and annotation values must be strings."""
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata", {}), dict):
        raise ApiError(400, f"{res.kind} in version \"{res.version}\" cannot be handled as a"
                            f" {res.kind}: json: cannot unmarshal into Go value of type {res.kind}")
    for field in ("labels", "annotations"):
        for value in (obj.get("metadata", {}).get(field) or {}).values():
            if not isinstance(value, str):
                go_type = {bool: "bool", dict: "object", list: "array"}.get(type(value), "number")
                raise ApiError(400, f'{res.kind} in version "{res.version}" cannot be handled as'
                                    f" a {res.kind}: json: cannot unmarshal {go_type} into Go"
                                    f" struct field ObjectMeta.metadata.{field} of type string")


def validate(res: Resource, obj: Obj, *, hpa_scale_to_zero: bool) -> None:
    """422 Invalid for the rules a client of the fake can trip over."""
    name = obj["metadata"].get("name", "")
    errors: list[tuple[str, Any, str]] = []
    if not name:
        errors.append(("metadata.name", None, "name or generateName is required"))
    spec = obj.get("spec") or {}
    if res is DEPLOYMENTS:
        errors += _deployment_errors(spec)
    elif res is PODS and not spec.get("containers"):
        errors.append(("spec.containers", None, ""))
    elif res is HPAS:
        errors += _hpa_errors(spec, 0 if hpa_scale_to_zero else 1)
    if errors:
        raise invalid(res.kind, res.group, name, errors)


def _deployment_errors(spec: Obj) -> list[tuple[str, Any, str]]:
    errors: list[tuple[str, Any, str]] = []
    replicas = spec.get("replicas")
    if not isinstance(replicas, int) or replicas < 0:
        errors.append(("spec.replicas", replicas, "must be greater than or equal to 0"))
    if not spec.get("selector"):
        errors.append(("spec.selector", None, ""))
    if not spec["template"]["spec"].get("containers"):
        errors.append(("spec.template.spec.containers", None, ""))
    return errors


def _hpa_errors(spec: Obj, floor: int) -> list[tuple[str, Any, str]]:
    errors: list[tuple[str, Any, str]] = []
    low, high = spec.get("minReplicas", 1), spec.get("maxReplicas")
    if not isinstance(low, int) or low < floor:
        errors.append(("spec.minReplicas", low, f"must be greater than or equal to {floor}"))
    if not isinstance(high, int) or high < 1:
        errors.append(("spec.maxReplicas", high, "must be greater than 0"))
    elif isinstance(low, int) and high < low:
        errors.append(("spec.maxReplicas", high, "must be greater than or equal to `minReplicas`"))
    return errors


# ---------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------


class Event(NamedTuple):
    rv: int
    type: str
    res: Resource
    obj: Obj  # as of this resourceVersion (for DELETED: the deleted object at the delete RV)
    old: Obj | None


@dataclasses.dataclass(eq=False)
class Watcher:
    res: Resource
    namespace: str | None
    match: Matcher
    queue: asyncio.Queue[Obj | None] = dataclasses.field(default_factory=asyncio.Queue)

    def offer(self, event: Event) -> None:
        """Translate like the real watch cache: objects moving in/out of the selector."""
        if event.res is not self.res or (
                self.namespace and event.obj["metadata"]["namespace"] != self.namespace):
            return
        now_in = self.match(event.obj)
        was_in = event.old is not None and event.type == "MODIFIED" and self.match(event.old)
        kind = event.type
        if kind == "MODIFIED" and not (now_in and was_in):
            kind = "ADDED" if now_in else "DELETED" if was_in else ""
        elif kind != "MODIFIED" and not now_in:
            kind = ""
        if kind:
            self.queue.put_nowait({"type": kind, "object": copy.deepcopy(event.obj)})


def expired(message: str) -> Obj:
    return {"type": "ERROR", "object": ApiError(410, message, "Expired").body()}


class Store:
    """Objects, one resourceVersion counter, the event history and the open watches."""

    def __init__(self, *, history: int, hpa_scale_to_zero: bool) -> None:
        self.rv = 1000
        self.floor = self.rv  # watching from an RV below this gets 410 Gone
        self.history = history
        self.hpa_scale_to_zero = hpa_scale_to_zero
        self.events: deque[Event] = deque()
        self.watchers: set[Watcher] = set()
        self.listeners: list[Callable[[Event], None]] = []
        self._objects: dict[tuple[Resource, str, str], Obj] = {}
        # The same objects by (resource, namespace), then name: a list reads its own kind
        # and namespace, not every object (10,000 Deployments made each pass quadratic).
        self._by_kind: dict[tuple[Resource, str], dict[str, Obj]] = {}

    # reads ------------------------------------------------------------------------------
    def get(self, res: Resource, namespace: str, name: str) -> Obj | None:
        found = self._objects.get((res, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def items(self, res: Resource, namespace: str | None = None,
              match: Matcher | None = None, *, copied: bool = True) -> list[Obj]:
        """Matching objects in name order; `copied=False` hands out the stored objects
        themselves, for controllers that only read them (copying 10,000 Deployments on every
        pass was most of a pass)."""
        groups = sorted((ns, objs) for (r, ns), objs in self._by_kind.items()
                        if r is res and namespace in (None, ns))
        found = (objs[name] for _, objs in groups for name in sorted(objs))
        chosen = (o for o in found if match is None or match(o))
        return [copy.deepcopy(o) for o in chosen] if copied else list(chosen)

    def all_uids(self) -> set[str]:
        return {obj["metadata"]["uid"] for obj in self._objects.values()}

    # writes -----------------------------------------------------------------------------
    def create(self, res: Resource, obj: Obj) -> Obj:
        check_decodable(res, obj)
        obj = copy.deepcopy(obj)
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        apply_defaults(res, obj)
        validate(res, obj, hpa_scale_to_zero=self.hpa_scale_to_zero)
        if (res, meta["namespace"], meta["name"]) in self._objects:
            raise ApiError(409, f'{res.qualified} "{meta["name"]}" already exists',
                           "AlreadyExists", _details(res, meta["name"]))
        for field in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(field, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now())
        if res.tracks_generation:
            meta["generation"] = 1
        if res.has_status:  # what a fresh object's status serialises as (non-omitempty fields)
            obj["status"] = {PODS: {"phase": "Pending", "qosClass": "BestEffort"},
                             SERVICES: {"loadBalancer": {}},
                             HPAS: {"desiredReplicas": 0}}.get(res, {})
        return self._write(res, "ADDED", obj, None)

    def replace(self, res: Resource, obj: Obj) -> Obj:
        """PUT semantics: optimistic lock on a given RV; status is kept (it is a subresource)."""
        check_decodable(res, obj)
        meta = obj.get("metadata") or {}
        old = self._objects.get((res, meta.get("namespace", ""), meta.get("name", "")))
        if old is None:
            raise not_found(res, meta.get("name", ""))
        if meta.get("resourceVersion") not in (None, "", old["metadata"]["resourceVersion"]):
            raise conflict(res, meta["name"])
        new = copy.deepcopy(obj)
        new["apiVersion"], new["kind"] = res.api_version, res.kind
        for field in ("uid", "creationTimestamp", "generation", "deletionTimestamp",
                      "deletionGracePeriodSeconds"):
            new["metadata"].pop(field, None)
            if field in old["metadata"]:
                new["metadata"][field] = old["metadata"][field]
        new.pop("status", None)
        if "status" in old:
            new["status"] = copy.deepcopy(old["status"])
        apply_defaults(res, new)
        validate(res, new, hpa_scale_to_zero=self.hpa_scale_to_zero)
        if res.tracks_generation and new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = old["metadata"].get("generation", 0) + 1
        return self._write_if_changed(res, new, old)

    def set_status(self, res: Resource, namespace: str, name: str, status: Obj) -> Obj | None:
        """A controller's or kubelet's status write; skipped (no RV bump) when nothing changed."""
        old = self._objects.get((res, namespace, name))
        if old is None or old.get("status") == status:
            return None
        return self._write_if_changed(res, {**copy.deepcopy(old), "status": status}, old)

    def delete(self, res: Resource, namespace: str, name: str, grace: int | None = None) -> Obj:
        """Remove at once, except Pods: they get a deletionTimestamp and the kubelet ends them."""
        old = self._objects.get((res, namespace, name))
        if old is None:
            raise not_found(res, name)
        if res is not PODS or grace == 0:
            return self.remove(res, namespace, name)
        if "deletionTimestamp" in old["metadata"]:
            return copy.deepcopy(old)
        if grace is None:
            grace = old["spec"].get("terminationGracePeriodSeconds", 30)
        new = copy.deepcopy(old)
        new["metadata"].update(deletionTimestamp=now(), deletionGracePeriodSeconds=grace)
        return self._write(res, "MODIFIED", new, old)

    def remove(self, res: Resource, namespace: str, name: str, uid: str | None = None) -> Obj:
        old = self._objects.get((res, namespace, name))
        if old is None or uid not in (None, old["metadata"]["uid"]):
            raise not_found(res, name)
        return self._write(res, "DELETED", copy.deepcopy(old), old)

    def _write_if_changed(self, res: Resource, new: Obj, old: Obj) -> Obj:
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return copy.deepcopy(old)  # like etcd3's GuaranteedUpdate: no-op writes are skipped
        return self._write(res, "MODIFIED", new, old)

    def _write(self, res: Resource, kind: str, obj: Obj, old: Obj | None) -> Obj:
        self.rv += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self.rv)
        for field in ("labels", "annotations", "ownerReferences", "finalizers"):
            if not meta.get(field, True):
                del meta[field]  # Go's omitempty: an empty map or list is not served
        key = (res, meta["namespace"], meta["name"])
        group = self._by_kind.setdefault((res, meta["namespace"]), {})
        if kind == "DELETED":
            del self._objects[key]
            del group[meta["name"]]
        else:
            self._objects[key] = obj
            group[meta["name"]] = obj
        event = Event(self.rv, kind, res, copy.deepcopy(obj), copy.deepcopy(old) if old else None)
        self.events.append(event)
        while len(self.events) > self.history:
            self.floor = self.events.popleft().rv
        for watcher in self.watchers:
            watcher.offer(event)
        for listener in self.listeners:
            listener(event)
        return copy.deepcopy(obj)

    # watches ----------------------------------------------------------------------------
    def open_watch(self, res: Resource, namespace: str | None, match: Matcher,
                   since: str | None) -> Watcher:
        """Queue the replay (or synthetic ADDEDs), then go live; all in one step on the loop."""
        watcher = Watcher(res, namespace, match)
        if since in (None, "", "0"):
            for obj in self.items(res, namespace, match):
                watcher.queue.put_nowait({"type": "ADDED", "object": obj})
        else:
            try:
                start = int(since)
            except ValueError as err:
                raise ApiError(400, f'resourceVersion: Invalid value: "{since}"') from err
            if start < self.floor:
                watcher.queue.put_nowait(expired(f"too old resource version: {start}"
                                                 f" ({self.floor + 1})"))
                watcher.queue.put_nowait(None)
                return watcher
            for event in self.events:
                if event.rv > start:
                    watcher.offer(event)
        self.watchers.add(watcher)
        return watcher

    def close_watch(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    def close_all_watches(self, error: Obj | None = None) -> None:
        for watcher in self.watchers:
            if error is not None:
                watcher.queue.put_nowait(copy.deepcopy(error))
            watcher.queue.put_nowait(None)
        self.watchers.clear()

    def compact(self) -> None:
        """Drop history. The counter moves on one, so a fresh list's RV is watchable again."""
        self.rv += 1
        self.events.clear()
        self.floor = self.rv


# ---------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------


class RequestRecord(NamedTuple):
    verb: str
    path: str
    query: dict[str, str]
    body: Any
    status: int
    content_type: str | None = None  # what the client declared (PATCH flavours differ)


class Route(NamedTuple):
    res: Resource
    namespace: str | None
    name: str | None
    sub: str | None


def parse_path(path: str) -> Route | None:
    """`/api/v1[/namespaces/NS]/PLURAL[/NAME[/SUB]]` and the `/apis/GROUP/VERSION/...` form."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not 1 <= len(rest) <= 3:
        return None
    for res in RESOURCES:
        if (res.group, res.version, res.plural) == (group, version, rest[0]):
            return Route(res, namespace, *[*rest[1:], None, None][:2])
    return None


def request_verb(method: str, route: Route | None, query: dict[str, str]) -> str:
    """Audit-style verb names."""
    if method == "GET" and route is not None and route.name is None:
        return "watch" if query.get("watch", "").lower() in ("true", "1") else "list"
    return {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete"}.get(method, method.lower())


@dataclasses.dataclass
class Injection:
    status: int
    verb: str | None
    resource: str | None
    subresource: str | None
    namespace: str | None
    name: str | None
    times: int
    reason: str | None
    message: str | None

    def matches(self, verb: str, route: Route | None) -> bool:
        wanted = (self.verb, self.resource, self.subresource, self.namespace, self.name)
        actual = (verb, route.res.plural if route else None, route.sub if route else None,
                  route.namespace if route else None, route.name if route else None)
        return self.times > 0 and all(w is None or w == a for w, a in zip(wanted, actual,
                                                                          strict=True))

    def error(self, verb: str, route: Route | None) -> ApiError:
        res, name = (route.res, route.name) if route else (DEPLOYMENTS, None)
        thing = f'{res.qualified} "{name}"' if name else res.qualified
        target = res.plural + (f"/{route.sub}" if route and route.sub else "")
        where = f' in the namespace "{route.namespace}"' if route and route.namespace else ""
        defaults = {
            403: f'{thing} is forbidden: User "torpor-test" cannot {verb} resource "{target}"'
                 f' in API group "{res.group}"{where}',
            409: conflict(res, name or "").message,
            429: "Too many requests, please try again later.",
            500: "Internal error occurred: injected failure",
            503: "the server is currently unable to handle the request"}
        message = self.message or defaults.get(self.status, f"injected {self.status}")
        details = _details(res, name)
        if self.status == 429:
            details["retryAfterSeconds"] = 1
        if self.status == 500:
            details["causes"] = [{"message": message}]
        return ApiError(self.status, message, self.reason, details,
                        {"Retry-After": "1"} if self.status in (429, 503) else None)


def _discovery(path: str, host: str) -> Obj | None:
    """Enough of /version, /api, /apis and the resource lists for clients that look."""
    if path == "/version":
        return {"major": "1", "minor": "37", "gitVersion": "v1.37.0-fake"}
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": host}]}
    groups = sorted({(r.group, r.version) for r in RESOURCES if r.group})
    if path == "/apis":
        entries = [{"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                    "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}}
                   for g, v in groups]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": entries}
    return None


def scale_of(deployment: Obj) -> Obj:
    """The autoscaling/v1 Scale view of a Deployment (spec.replicas is omitempty there)."""
    meta = deployment["metadata"]
    replicas = deployment["spec"].get("replicas", 0)
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                              "creationTimestamp")},
            "spec": {"replicas": replicas} if replicas else {},
            "status": {"replicas": deployment.get("status", {}).get("replicas", 0),
                       "selector": selector_string(deployment["spec"].get("selector"))}}


def _without_type(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}


class ApiServer:
    """The aiohttp application: one catch-all route so unknown paths answer a real 404."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.requests: list[RequestRecord] = []
        self.injections: list[Injection] = []
        self.app = web.Application(client_max_size=16 * 1024 * 1024)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        route = parse_path(request.path)
        verb = request_verb(request.method, route, query)
        raw, body = await request.read(), None
        headers: dict[str, str] = {}
        try:
            body = json.loads(raw) if raw else None
            for injection in self.injections:
                if injection.matches(verb, route):
                    injection.times -= 1
                    raise injection.error(verb, route)
            if verb == "watch" and route is not None:
                return await self._watch(request, route, query)
            status, payload = self._dispatch(request, verb, route, query, body)
        except ApiError as err:
            status, payload, headers = err.code, err.body(), err.headers
        except json.JSONDecodeError as err:
            status, payload = 400, ApiError(400, f"json parse error: {err}").body()
        self.requests.append(RequestRecord(verb, request.path, query, body, status,
                                           request.headers.get("Content-Type")))
        return web.json_response(payload, status=status, headers=headers)

    def _dispatch(self, request: web.Request, verb: str, route: Route | None,
                  query: dict[str, str], body: Any) -> tuple[int, Obj]:
        if route is None or (route.namespace is None and route.name is not None):
            found = _discovery(request.path, request.host) if verb == "get" else None
            if found is None:
                raise ApiError(404, "the server could not find the requested resource",
                               details={})
            return 200, found
        if route.sub is not None:
            return self._scale(request, verb, route, body)
        named = route.name is not None
        if verb == "list" and not named:
            items = self.store.items(route.res, route.namespace, query_matcher(query))
            return 200, {"kind": f"{route.res.kind}List", "apiVersion": route.res.api_version,
                         "metadata": {"resourceVersion": str(self.store.rv)},
                         "items": [_without_type(i) for i in items]}
        if route.namespace is None and verb != "list":
            raise ApiError(405, "the server does not allow this method on the requested resource",
                           details={})
        if verb == "create" and not named:
            return 201, self._create(route, body)
        if verb == "get" and named:
            return 200, self._get(route)
        if verb == "update" and named:
            return 200, self._update(route, body)
        if verb == "patch" and named:
            patched = apply_patch(request.content_type, self._get(route), body)
            patched["metadata"].update(name=route.name, namespace=route.namespace)
            return 200, self.store.replace(route.res, patched)
        if verb == "delete" and named:
            return 200, self._delete(route, query, body)
        raise ApiError(405, "the server does not allow this method on the requested resource",
                       details={})

    def _get(self, route: Route) -> Obj:
        found = self.store.get(route.res, route.namespace or "", route.name or "")
        if found is None:
            raise not_found(route.res, route.name or "")
        return found

    def _create(self, route: Route, body: Any) -> Obj:
        check_decodable(route.res, body)
        meta = body.setdefault("metadata", {})
        if meta.setdefault("namespace", route.namespace) != route.namespace:
            raise ApiError(400, "the namespace of the provided object does not match the"
                                " namespace sent on the request")
        return self.store.create(route.res, body)

    def _update(self, route: Route, body: Any) -> Obj:
        check_decodable(route.res, body)
        meta = body.setdefault("metadata", {})
        if meta.get("name") != route.name:
            raise ApiError(400, f"the name of the object ({meta.get('name')}) does not match"
                                f" the name on the URL ({route.name})")
        meta["namespace"] = route.namespace
        return self.store.replace(route.res, body)

    def _delete(self, route: Route, query: dict[str, str], body: Any) -> Obj:
        options = body if isinstance(body, dict) else {}
        grace = options.get("gracePeriodSeconds", query.get("gracePeriodSeconds"))
        deleted = self.store.delete(route.res, route.namespace or "", route.name or "",
                                    None if grace is None else int(grace))
        if route.res in (PODS, SERVICES):  # these answer the object, the others a Status
            return deleted
        details = _details(route.res, route.name, uid=deleted["metadata"]["uid"])
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": details}

    def _scale(self, request: web.Request, verb: str, route: Route, body: Any) -> tuple[int, Obj]:
        if route.sub == "status" and verb == "get" and route.namespace is not None:
            return 200, self._get(route)
        if route.res is not DEPLOYMENTS or route.sub != "scale" or route.namespace is None:
            raise ApiError(404, "the server could not find the requested resource", details={})
        deployment = self._get(route)
        if verb == "get":
            return 200, scale_of(deployment)
        if verb == "patch":
            body = apply_patch(request.content_type, scale_of(deployment), body)
        elif verb != "update":
            raise ApiError(405, "the server does not allow this method on the requested resource",
                           details={})
        if not isinstance(body, dict):
            raise ApiError(400, "Scale in version \"v1\" cannot be handled as a Scale")
        wanted_rv = (body.get("metadata") or {}).get("resourceVersion")
        if wanted_rv not in (None, "", deployment["metadata"]["resourceVersion"]):
            raise conflict(DEPLOYMENTS, route.name or "")
        replicas = (body.get("spec") or {}).get("replicas", 0)
        if not isinstance(replicas, int) or replicas < 0:
            raise invalid("Scale", "autoscaling", route.name or "",
                          [("spec.replicas", replicas, "must be greater than or equal to 0")])
        deployment["spec"]["replicas"] = replicas
        return 200, scale_of(self.store.replace(DEPLOYMENTS, deployment))

    async def _watch(self, request: web.Request, route: Route,
                     query: dict[str, str]) -> web.StreamResponse:
        """Newline-delimited events, flushed one by one, until timeoutSeconds or close."""
        watcher = self.store.open_watch(route.res, route.namespace, query_matcher(query),
                                        query.get("resourceVersion"))
        self.requests.append(RequestRecord("watch", request.path, query, None, 200))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        timeout = float(query.get("timeoutSeconds") or 0) or None
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        deadline = asyncio.get_running_loop().time() + timeout if timeout else None
        try:
            await response.prepare(request)
            while True:
                left = None if deadline is None else deadline - asyncio.get_running_loop().time()
                try:
                    async with asyncio.timeout(left):
                        event = await watcher.queue.get()
                except TimeoutError:
                    if bookmarks:
                        await response.write(self._bookmark(route.res))
                    break
                if event is None:
                    break
                await response.write(json.dumps(event).encode() + b"\n")
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        finally:
            self.store.close_watch(watcher)
        return response

    def _bookmark(self, res: Resource) -> bytes:
        obj = {"kind": res.kind, "apiVersion": res.api_version,
               "metadata": {"resourceVersion": str(self.store.rv)}}
        return json.dumps({"type": "BOOKMARK", "object": obj}).encode() + b"\n"
