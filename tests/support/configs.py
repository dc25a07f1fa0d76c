"""Config files for tests: every address on a loopback port reserved for the test run
(tests/support/net.py), state in a temp dir."""

from __future__ import annotations

from pathlib import Path

from tests.support.net import free_port


def write_config(tmp: Path, services: str, extra: str = "",
                 activator: str = "wake_timeout: 30s", workloads: str = "{kind: local}",
                 sockets: bool = True) -> Path:
    """A config on reserved ports; `services` is the YAML list under `services:`, `extra`
    more top-level sections, `activator` more keys of the activator section, `workloads`
    the workloads section. `sockets`: Envoy's admin and ADS on their default owner-only
    Unix sockets (in tmp/torpor-logs), as a user's config without those keys; False: both
    on TCP ports (a test that starts its own Envoy on control_plane.xds)."""
    names = ("listen", "admin", "xds", "api", "metrics", "act", "actm", "acth2")
    p = {k: free_port() for k in names}
    admin = "" if sockets else f", admin: 127.0.0.1:{p['admin']}"
    xds = "" if sockets else f"xds: 127.0.0.1:{p['xds']}, "
    text = f"""
gateway: {{listen: 127.0.0.1:{p['listen']}{admin}}}
control_plane: {{{xds}admin_api: 127.0.0.1:{p['api']},
                metrics: 127.0.0.1:{p['metrics']}}}
activator: {{listen: 127.0.0.1:{p['act']}, metrics: 127.0.0.1:{p['actm']},
            listen_h2: 127.0.0.1:{p['acth2']}, {activator}}}
store: {{kind: sqlite, path: ./state.db}}
workloads: {workloads}
{extra}
services:
{services}
"""
    path = tmp / "torpor.yaml"
    path.write_text(text)
    return path


def model_service(name: str, replicas: int, load_seconds: float = 0.0,
                  flags: str = "") -> str:
    """One `services:` entry running the example model server (`flags`: more arguments,
    comma-separated YAML, e.g. ', --log-requests')."""
    return f"""  - name: {name}
    host: {name}.localhost
    replicas: {replicas}
    local:
      command: [python, -m, torpor.examples.model_server, --port, "{{port}}", --name, {name},
                --load-seconds, "{load_seconds}"{flags}]
      ready_path: /healthz
      stop_grace: 5s
"""
