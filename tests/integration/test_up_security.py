"""`torpor up`'s control surfaces are authenticated, as a user runs it: Envoy's admin and
ADS on owner-only Unix sockets by default (no TCP port for either), the admin API behind
the token `up` creates (found by every CLI verb through --config), and with
`control_plane.tls` ADS over TCP only for clients with a certificate of the CA."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from tests.support.configs import model_service, write_config
from tests.support.net import free_port
from tests.support.up import Up, UpRuns, processes_mentioning, status_json
from torpor.config import load_config
from torpor.gateway import admin_session, admin_url

pytestmark = pytest.mark.envoy

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


@pytest.fixture
async def runs() -> AsyncIterator[UpRuns]:
    runs = UpRuns()
    yield runs
    await runs.stop_all()


def torpor(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "assembly.cli", *argv], capture_output=True,
                          text=True, timeout=120, env=env)


def envoy_pid(logs: Path) -> int:
    (found,) = processes_mentioning(str(logs / "envoy-bootstrap.json"))
    return int(found.split(":", 1)[0])


def tcp_listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on: its socket inodes matched against the LISTEN
    rows of /proc/net/tcp and tcp6."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def ads_request(channel: grpc.Channel) -> discovery_pb2.DiscoveryResponse:
    """Open an ADS stream as an Envoy would and read the first answer (clusters)."""
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    request = discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id="intruder"),
                                             type_url=CLUSTER_TYPE)
    stream = stub.StreamAggregatedResources(iter([request]), timeout=5)
    return next(iter(stream))


async def test_up_uses_owner_only_sockets_and_its_admin_token(tmp_path: Path,
                                                              runs: UpRuns) -> None:
    path = write_config(tmp_path, model_service("echo", 1))  # no gateway.admin, no xds
    config = load_config(path)
    up = await runs.start(path)
    logs = config.log_dir()
    assert "envoy.admin_on_tcp" not in up.text()
    assert "xds_listener.unauthenticated" not in up.text()

    # Envoy's admin and ADS: Unix sockets only their owner may open.
    for socket_file in (logs / "envoy-admin.sock", logs / "xds.sock"):
        mode = socket_file.stat().st_mode
        assert stat.S_ISSOCK(mode), socket_file
        assert stat.S_IMODE(mode) == 0o600, (socket_file, oct(mode))
        assert socket_file.stat().st_uid == os.getuid()
    assert config.gateway.admin.unix == logs / "envoy-admin.sock"
    # No TCP admin: Envoy listens on the gateway port and nothing else (not on 9901).
    assert tcp_listening_ports(envoy_pid(logs)) == {config.gateway.listen.port}
    # ... and its admin answers through the socket.
    async with admin_session(config.gateway.admin, 10) as session, \
            session.get(admin_url(config.gateway.admin, "/ready")) as response:
        assert response.status == 200

    # The admin API: the token `up` created, beside its state, owner-only.
    token = logs / "admin-token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    statuses = await asyncio.to_thread(status_json, path)  # `torpor status --json --config`
    assert [s["name"] for s in statuses] == ["echo"]
    hibernated = await asyncio.to_thread(torpor, "hibernate", "echo", "--config", str(path))
    assert hibernated.returncode == 0, hibernated.stderr
    assert "HIBERNATED" in hibernated.stdout
    woken = await asyncio.to_thread(torpor, "wake", "echo", "--config", str(path))
    assert woken.returncode == 0, woken.stderr

    # Someone with another token (or none): denied, with a reason, and nothing changes.
    env = {**os.environ, "TORPOR_ADMIN_TOKEN": "guessed"}
    denied = await asyncio.to_thread(torpor, "hibernate", "echo", "--config", str(path),
                                     env=env)
    assert denied.returncode == 1
    assert "permission denied: Hibernate: the admin token is not valid" in denied.stderr
    assert "Traceback" not in denied.stderr
    assert (await asyncio.to_thread(status_json, path))[0]["state"] == "ACTIVE"


@pytest.fixture
def certs(tmp_path: Path) -> Iterator[Path]:
    out = tmp_path / "certs"
    made = torpor("certs", "--out", str(out))
    assert made.returncode == 0, made.stderr
    other = torpor("certs", "--out", str(tmp_path / "other-ca"))  # a CA torpor does not trust
    assert other.returncode == 0, other.stderr
    yield out


def mtls_config(tmp_path: Path, xds_port: int) -> Path:
    p = {k: free_port() for k in ("listen", "api", "metrics", "act", "actm", "acth2")}
    path = tmp_path / "torpor.yaml"
    path.write_text(f"""
gateway:
  listen: 127.0.0.1:{p['listen']}
  xds_tls: {{cert: certs/envoy.pem, key: certs/envoy-key.pem, ca: certs/ca.pem}}
control_plane:
  xds: 127.0.0.1:{xds_port}
  tls: {{cert: certs/server.pem, key: certs/server-key.pem, client_ca: certs/ca.pem}}
  admin_api: 127.0.0.1:{p['api']}
  metrics: 127.0.0.1:{p['metrics']}
activator: {{listen: 127.0.0.1:{p['act']}, metrics: 127.0.0.1:{p['actm']},
            listen_h2: 127.0.0.1:{p['acth2']}}}
store: {{kind: sqlite, path: ./state.db}}
services:
{model_service("echo", 1)}""")
    return path


async def test_ads_over_tcp_with_mtls_refuses_clients_without_a_valid_certificate(
        tmp_path: Path, certs: Path, runs: UpRuns) -> None:
    xds_port = free_port()
    path = mtls_config(tmp_path, xds_port)
    up: Up = await runs.start(path)  # ready: its Envoy connected with its certificate
    assert "xds_listener.unauthenticated" not in up.text()  # the plain-TCP warning
    target = f"127.0.0.1:{xds_port}"

    def read(file: str) -> bytes:
        return (certs / file).read_bytes()

    valid = grpc.ssl_channel_credentials(read("ca.pem"), read("envoy-key.pem"),
                                         read("envoy.pem"))
    with grpc.secure_channel(target, valid) as channel:
        answer = await asyncio.to_thread(ads_request, channel)
        assert answer.type_url == CLUSTER_TYPE and answer.resources

    other = tmp_path / "other-ca"
    refused = {
        "plaintext": None,
        "no client certificate": grpc.ssl_channel_credentials(read("ca.pem")),
        "certificate of another CA": grpc.ssl_channel_credentials(
            read("ca.pem"), (other / "envoy-key.pem").read_bytes(),
            (other / "envoy.pem").read_bytes()),
    }
    for what, credentials in refused.items():
        channel = (grpc.insecure_channel(target) if credentials is None
                   else grpc.secure_channel(target, credentials))
        with channel, pytest.raises(grpc.RpcError) as info:
            await asyncio.to_thread(ads_request, channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, what
