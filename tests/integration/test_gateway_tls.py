"""TLS on the gateway's listener through `torpor up` and a real Envoy: the certificate the
client asks for by name (SNI), HTTP/2 offered by ALPN and spoken, and a renewed
certificate file served without a restart (SDS over ADS); a broken renewal keeps the
certificate Envoy has and says why."""

from __future__ import annotations

import asyncio
import datetime
import re
import socket
import ssl
import subprocess
from pathlib import Path

import aiohttp
import h2.connection
import h2.events
import pytest
from cryptography import x509

from tests.support.configs import model_service, write_config
from tests.support.net import wait_until
from tests.support.up import UpRuns
from torpor.certs import issue, make_ca
from torpor.config import load_config

pytestmark = pytest.mark.envoy

HOST, OTHER = "tls.localhost", "other.localhost"


def write_pair(folder: Path, stem: str, pem: bytes, key: bytes) -> tuple[Path, Path]:
    """Certificate and key, each replaced in one rename (what a renewal tool does)."""
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}-key.pem"
    for path, data in ((cert_path, pem), (key_path, key)):
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return cert_path, key_path


def served_certificate(port: int, name: str, ca: Path) -> tuple[x509.Certificate, str | None]:
    """The certificate the gateway presents for `name` (SNI), and the ALPN it chose."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der), tls.selected_alpn_protocol()


def http2_get(port: int, ca: Path, path: str) -> tuple[int, bytes]:
    """One GET over HTTP/2 (ALPN h2) with the `h2` library: status and body."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=HOST) as tls:
        assert tls.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":path", path), (":scheme", "https"),
                              (":authority", HOST)], end_stream=True)
        tls.sendall(conn.data_to_send())
        status, body = 0, b""
        while True:
            data = tls.recv(65536)
            assert data, "connection closed before the response ended"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    return status, body
            tls.sendall(conn.data_to_send())


async def test_the_gateway_speaks_tls_and_http2_and_takes_a_renewed_certificate(
        tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, ca_cert, ca_key = make_ca(days=2)
    (certs / "ca.pem").write_bytes(ca.cert)
    first = issue(ca_cert, ca_key, HOST, [HOST], client=False, days=2)
    other = issue(ca_cert, ca_key, OTHER, [OTHER], client=False, days=2)
    cert, key = write_pair(certs, "gateway", first.cert, first.key)
    other_cert, other_key = write_pair(certs, "other", other.cert, other.key)
    path = write_config(tmp_path, model_service("tls", 1).replace(
        "host: tls.localhost", f"host: {HOST}\n    hosts: [{OTHER}]"))
    text = path.read_text()
    text = re.sub(r"gateway: \{listen: (127\.0\.0\.1:\d+)\}", lambda m: (
        f"gateway: {{listen: {m.group(1)}, tls: {{cert: {cert}, key: {key}, sni: "
        f"[{{hosts: [{OTHER}], cert: {other_cert}, key: {other_key}}}]}}}}"), text)
    text = text.replace("control_plane: {", "control_plane: {reload_poll: 0.5s, ", 1)
    path.write_text(text)
    config = load_config(path)
    port = config.gateway.listen.port
    ca_path = certs / "ca.pem"
    runs = UpRuns()
    try:
        await runs.start(path)
        # HTTP/1.1 over TLS, the default certificate.
        context = ssl.create_default_context(cafile=str(ca_path))
        async with aiohttp.ClientSession() as session, session.get(
                f"https://127.0.0.1:{port}/healthz", ssl=context, server_hostname=HOST,
                headers={"Host": HOST}) as r:
            assert (r.status, await r.text()) == (200, "ok")
        # What a user types: curl --cacert, over HTTP/2 (curl is built with nghttp2 here).
        curl = await asyncio.to_thread(subprocess.run, [
            "curl", "--silent", "--show-error", "--http2", "--cacert", str(ca_path),
            "--resolve", f"{HOST}:{port}:127.0.0.1", "--write-out", " %{http_version}",
            f"https://{HOST}:{port}/healthz"], capture_output=True, text=True, timeout=30)
        assert (curl.returncode, curl.stdout) == (0, "ok 2"), curl.stderr
        served, alpn = await asyncio.to_thread(served_certificate, port, HOST, ca_path)
        assert alpn == "h2"
        assert served.serial_number == x509.load_pem_x509_certificate(first.cert).serial_number
        # SNI: the other name gets its own certificate.
        served, _ = await asyncio.to_thread(served_certificate, port, OTHER, ca_path)
        assert served.subject.rfc4514_string().startswith(f"CN={OTHER},")
        # HTTP/2 end to end.
        assert await asyncio.to_thread(http2_get, port, ca_path, "/healthz") == (200, b"ok")

        # A renewal: new files, the same paths; served without a restart.
        renewed = issue(ca_cert, ca_key, HOST, [HOST], client=False, days=3,
                        now=datetime.datetime.now(datetime.UTC))
        write_pair(certs, "gateway", renewed.cert, renewed.key)
        new_serial = x509.load_pem_x509_certificate(renewed.cert).serial_number

        async def renewed_served() -> bool:
            cert_now, _ = await asyncio.to_thread(served_certificate, port, HOST, ca_path)
            return cert_now.serial_number == new_serial

        await wait_until(renewed_served, 20, "the renewed certificate served", interval=0.2)
        # A broken renewal (the key of another certificate): the renewed one stays.
        write_pair(certs, "gateway", first.cert, renewed.key)
        metrics_url = f"http://{config.control_plane.metrics}/metrics"

        async def failure_counted() -> bool:
            async with aiohttp.ClientSession() as session, session.get(metrics_url) as r:
                return 'torpor_tls_reloads_total{result="failed"}' in await r.text()

        await wait_until(failure_counted, 20, "the broken renewal counted as failed")
        assert await renewed_served()
    finally:
        await runs.stop_all()
