"""Authentication enforced by Envoy (configured over xDS) through `torpor up`: requests
without a key, with a wrong key, without a JWT, with an expired one or one of another
issuer are refused 401 with a JSON body, never reaching the activator (a sleeping
service stays asleep) or a replica; good credentials pass; a key added to the file works
without a restart; a service without auth is not asked."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.support.configs import model_service, write_config
from tests.support.net import wait_until
from tests.support.up import UpRuns, served_by, status_json
from torpor import admin_client
from torpor.config import load_config
from torpor.credentials import admin_target

pytestmark = pytest.mark.envoy

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef01"
ISSUER, AUDIENCE = "https://issuer.test", "torpor"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwks_and_signer(folder: Path) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    numbers = key.public_key().public_numbers()
    jwks = {"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
                      "x": b64(numbers.x.to_bytes(32, "big")),
                      "y": b64(numbers.y.to_bytes(32, "big"))}]}
    path = folder / "jwks.json"
    path.write_text(json.dumps(jwks))
    return path, key


def token(key: ec.EllipticCurvePrivateKey, issuer: str = ISSUER, expires_in: float = 600
          ) -> str:
    """An ES256 JWT (header.payload.signature, each base64url)."""
    now = int(time.time())
    head = b64(json.dumps({"alg": "ES256", "typ": "JWT", "kid": "k1"}).encode())
    body = b64(json.dumps({"iss": issuer, "aud": AUDIENCE, "sub": "tester", "iat": now - 60,
                           "exp": now + int(expires_in)}).encode())
    r, s = decode_dss_signature(key.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256())))
    return f"{head}.{body}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


async def test_envoy_refuses_bad_credentials_before_anything_else_sees_them(
        tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# who may call `keyed`\nalice: {ALICE}\n")
    jwks, signer = jwks_and_signer(tmp_path)
    log_requests = ", --log-requests"
    services = (model_service("keyed", 1, flags=log_requests)
                + f"    auth: {{api_keys: {keys}}}\n"
                + model_service("tokened", 1, flags=log_requests)
                + f"    auth: {{jwt: {{issuer: '{ISSUER}', jwks: {jwks}, "
                  f"audiences: [{AUDIENCE}]}}}}\n"
                + model_service("open", 1))
    path = write_config(tmp_path, services)
    text = path.read_text().replace("control_plane: {", "control_plane: {reload_poll: 0.5s, ", 1)
    path.write_text(text)
    config = load_config(path)
    gateway = f"http://{config.gateway.listen}/predict?text=good"
    runs = UpRuns()

    async def get(host: str, **headers: str) -> tuple[int, dict[str, Any] | str]:
        return await served_by(gateway, host, **headers)

    try:
        await runs.start(path)
        await asyncio.to_thread(admin_client.hibernate, admin_target(config), "keyed")
        # No key, a wrong key: 401 from Envoy; the sleeping service is not woken.
        status, body = await get("keyed")
        assert status == 401 and isinstance(body, dict) and body["error"] == "unauthorized"
        assert (await get("keyed", **{"x-api-key": "wrong-key-0123456789abcdef"}))[0] == 401
        by_name = {s["name"]: s for s in status_json(path)}
        assert by_name["keyed"]["state"] == "HIBERNATED"
        # The right key passes (and wakes it).
        assert await get("keyed", **{"x-api-key": ALICE}) == (200, "keyed")

        # JWT: missing, expired, another issuer: 401 with Envoy's reason; a good one passes.
        assert (await get("tokened"))[0] == 401
        expired = token(signer, expires_in=-120)
        status, body = await get("tokened", Authorization=f"Bearer {expired}")
        assert status == 401 and isinstance(body, dict) and "expired" in body["message"]
        other = token(signer, issuer="https://other.test")
        assert (await get("tokened", Authorization=f"Bearer {other}"))[0] == 401
        assert await get("tokened", Authorization=f"Bearer {token(signer)}") == (200, "tokened")
        assert await get("open") == (200, "open")  # a service without auth is not asked

        # A key added to the file works without a restart.
        keys.write_text(f"alice: {ALICE}\nbob: {BOB}\n")

        async def bob_allowed() -> bool:
            return (await get("keyed", **{"x-api-key": BOB}))[0] == 200

        await wait_until(bob_allowed, 20, "bob's new key accepted", interval=0.2)
        assert await get("keyed", **{"x-api-key": ALICE}) == (200, "keyed")
        # The replicas saw the accepted requests only (their request logs).
        served = {name: "".join(p.read_text() for p in config.log_dir().glob(f"{name}-*.log"))
                  .count("request GET /predict") for name in ("keyed", "tokened")}
        assert served["tokened"] == 1
        bob_tries = served["keyed"] - 2  # alice twice; bob once accepted, after the reload
        assert bob_tries == 1, served
    finally:
        await runs.stop_all()
