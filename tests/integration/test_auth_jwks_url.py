"""JWT checked by Envoy with the JWKS fetched from a URL (`jwt.jwks_url`), through `torpor
up`: a JWKS server on loopback over http (an address: Envoy's STATIC cluster) and over
https (the name `localhost`: STRICT_DNS, the server's certificate checked against
`jwks_ca`). The JWKS is fetched before the gateway serves; a good token passes, a missing,
expired or other issuer's one, or one of a key the JWKS does not hold, gets 401 JSON; a
key rotated on the server is taken after `jwks_cache` (the old key then refused); a JWKS
host that cannot be reached lets nobody in while a service without auth still answers.
A provider added by a config reload brings its JWKS host's cluster into Envoy, and the
cluster leaves with the last provider that names it."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.support.configs import model_service, write_config
from tests.support.net import free_port, wait_until
from tests.support.up import UpRuns, served_by
from torpor.config import load_config
from torpor.gateway import admin_session, admin_url

pytestmark = pytest.mark.envoy

ISSUER, AUDIENCE = "https://issuer.test", "torpor"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
            "x": b64(numbers.x.to_bytes(32, "big")), "y": b64(numbers.y.to_bytes(32, "big"))}


def token(key: ec.EllipticCurvePrivateKey, kid: str, issuer: str = ISSUER,
          expires_in: float = 600) -> str:
    """An ES256 JWT (header.payload.signature, each base64url)."""
    now = int(time.time())
    head = b64(json.dumps({"alg": "ES256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps({"iss": issuer, "aud": AUDIENCE, "sub": "tester", "iat": now - 60,
                           "exp": now + int(expires_in)}).encode())
    r, s = decode_dss_signature(key.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256())))
    return f"{head}.{body}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for `localhost` and 127.0.0.1 that is its own CA, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "jwks-cert.pem", folder / "jwks-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class JwksServer:
    """Serves `jwks` at /jwks.json on 127.0.0.1 (a port it binds itself) and counts the
    fetches."""

    def __init__(self, jwks: dict[str, object]) -> None:
        self.jwks = jwks
        self.fetches = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _serve(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response(self.jwks)

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        app = web.Application()
        app.router.add_get("/jwks.json", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def servers() -> AsyncIterator[list[JwksServer]]:
    made: list[JwksServer] = []
    yield made
    for server in made:
        await server.stop()


async def test_envoy_fetches_the_jwks_and_follows_a_rotated_key(
        tmp_path: Path, servers: list[JwksServer]) -> None:
    first, second, stranger = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    plain = JwksServer({"keys": [jwk(first, "k1")]})
    secure = JwksServer({"keys": [jwk(first, "k1")]})
    servers.extend([plain, secure])
    cert, key = self_signed(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    await plain.start()
    await secure.start(tls)
    nowhere = free_port()  # reserved for this run, and nothing listens on it

    def jwt(url: str, more: str = "") -> str:
        return (f"    auth: {{jwt: {{issuer: '{ISSUER}', audiences: [{AUDIENCE}], "
                f"jwks_url: '{url}'{more}}}}}\n")

    services = (model_service("plain", 1)
                + jwt(f"http://127.0.0.1:{plain.port}/jwks.json", ", jwks_cache: 2s")
                + model_service("secure", 1)
                + jwt(f"https://localhost:{secure.port}/jwks.json",
                      f", jwks_ca: {cert}, jwks_timeout: 2s")
                + model_service("unreachable", 1)
                + jwt(f"http://127.0.0.1:{nowhere}/jwks.json", ", jwks_timeout: 1s")
                + model_service("open", 1))
    path = write_config(tmp_path, services)
    config = load_config(path)
    gateway = f"http://{config.gateway.listen}/predict?text=good"
    runs = UpRuns()

    async def get(host: str, bearer: str | None = None) -> tuple[int, dict[str, Any] | str]:
        headers = {} if bearer is None else {"Authorization": f"Bearer {bearer}"}
        return await served_by(gateway, host, **headers)

    try:
        await runs.start(path)
        # Fetched before the gateway served anything: no request waits for the JWKS.
        assert plain.fetches >= 1 and secure.fetches >= 1
        good = token(first, "k1")
        for name in ("plain", "secure"):
            assert await get(name, good) == (200, name)
            status, body = await get(name)
            assert status == 401 and isinstance(body, dict) and body["error"] == "unauthorized"
            status, body = await get(name, token(first, "k1", expires_in=-120))
            assert status == 401 and isinstance(body, dict) and "expired" in body["message"]
            assert (await get(name, token(first, "k1", issuer="https://other.test")))[0] == 401
            assert (await get(name, token(stranger, "k1")))[0] == 401  # a key not in the JWKS
        # A JWKS host that does not answer: nobody in; a service without auth still answers.
        status, body = await get("unreachable", good)
        assert status == 401 and isinstance(body, dict), body
        assert await get("open") == (200, "open")

        # Key rotation on the JWKS server: a token of the new key is refused until the
        # cached JWKS (2 s) is fetched again, then accepted, and the old key's refused.
        rotated = token(second, "k2")
        assert (await get("plain", rotated))[0] == 401
        plain.jwks = {"keys": [jwk(second, "k2")]}
        fetches = plain.fetches

        async def rotated_accepted() -> bool:
            return await get("plain", rotated) == (200, "plain")

        await wait_until(rotated_accepted, 30, "the rotated key accepted", interval=0.25)
        assert plain.fetches > fetches
        assert (await get("plain", good))[0] == 401
    finally:
        await runs.stop_all()


async def test_the_jwks_cluster_comes_and_goes_with_the_provider(
        tmp_path: Path, servers: list[JwksServer]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwks = JwksServer({"keys": [jwk(key, "k1")]})
    servers.append(jwks)
    await jwks.start()
    open_entry = model_service("svc", 1)
    auth = (f"    auth: {{jwt: {{issuer: '{ISSUER}', "
            f"jwks_url: 'http://127.0.0.1:{jwks.port}/jwks.json'}}}}\n")
    path = write_config(tmp_path, open_entry)
    path.write_text(path.read_text().replace("control_plane: {",
                                             "control_plane: {reload_poll: 0.5s, ", 1))
    config = load_config(path)
    gateway = f"http://{config.gateway.listen}/predict?text=good"
    runs = UpRuns()

    async def status(bearer: str | None = None) -> int:
        headers = {"Host": "svc.localhost"}
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        async with aiohttp.ClientSession() as session, \
                session.get(gateway, headers=headers) as r:
            await r.read()
            return r.status

    async def jwks_clusters() -> list[str]:
        url = admin_url(config.gateway.admin, "/clusters")
        async with admin_session(config.gateway.admin, 10) as admin, admin.get(url) as r:
            text = await r.text()
        return sorted({line.split("::")[0] for line in text.splitlines()
                       if line.startswith("torpor_jwks_")})

    def edit(entry: str) -> None:
        text = path.read_text()
        path.write_text(text[:text.index("services:")] + "services:\n" + entry)

    try:
        await runs.start(path)
        assert await status() == 200 and await jwks_clusters() == []
        edit(open_entry + auth)

        async def asked() -> bool:
            return await status() == 401

        await wait_until(asked, 30, "svc asks for a JWT")
        assert await status(token(key, "k1")) == 200
        (cluster,) = await jwks_clusters()
        assert cluster.startswith("torpor_jwks_127_0_0_1_")
        edit(open_entry)

        async def not_asked() -> bool:
            return await status() == 200

        await wait_until(not_asked, 30, "svc open again")

        async def cluster_gone() -> bool:
            return await jwks_clusters() == []

        await wait_until(cluster_gone, 30, "the JWKS cluster removed")
    finally:
        await runs.stop_all()
