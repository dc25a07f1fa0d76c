"""torpor's etcd client with TLS and etcd's auth, against a real etcd started with
--client-cert-auth (certificates from `torpor certs`), then with a user and auth enabled."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from aetcd import rpc

from tests.support.etcd import EtcdServer
from tests.support.net import wait_until
from torpor.certs import make_certs, write_certs
from torpor.config import ClientTlsConfig, load_config
from torpor.coordination import open_coordination
from torpor.errors import StoreError
from torpor.etcd.connection import EtcdConnection, EtcdCredentials, channel_credentials

PREFIX = "/tls-test/"
PASSWORD = "s3cret-for-root"


class TlsEtcd(EtcdServer):
    """An etcd whose client port speaks TLS only and wants a certificate of `certs`' CA."""

    def __init__(self, workdir: Path, certs: Path) -> None:
        super().__init__(workdir, "torpor-tls")
        self.certs = certs

    @property
    def client_url(self) -> str:
        return f"https://127.0.0.1:{self.client_port}"

    def command(self) -> list[str]:
        return [*super().command(),
                "--cert-file", str(self.certs / "server.pem"),
                "--key-file", str(self.certs / "server-key.pem"),
                "--client-cert-auth", "--trusted-ca-file", str(self.certs / "ca.pem")]

    async def wait_ready(self, timeout: float = 30.0) -> None:
        async def answers() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            conn = EtcdConnection([self.endpoint], PREFIX, 1.0, EtcdCredentials(tls=tls(self)))
            try:
                await conn.open()
            except StoreError:
                return False
            finally:
                await conn.close()
            return True

        await wait_until(answers, timeout, "etcd answers over TLS", interval=0.1)


def tls(etcd: TlsEtcd, client_cert: bool = True) -> ClientTlsConfig:
    certs = etcd.certs
    if not client_cert:
        return ClientTlsConfig(ca=certs / "ca.pem")
    return ClientTlsConfig(ca=certs / "ca.pem", cert=certs / "envoy.pem",
                           key=certs / "envoy-key.pem")


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[TlsEtcd]:
    certs = tmp_path / "certs"
    write_certs(certs, make_certs())
    server = TlsEtcd(tmp_path / "etcd", certs)
    try:
        await server.start_ready()
        yield server
    finally:
        server.stop()


async def opens(etcd: TlsEtcd, credentials: EtcdCredentials) -> bool:
    conn = EtcdConnection([etcd.endpoint], PREFIX, 2.0, credentials)
    try:
        await conn.open()
        created, _ = await conn.create(conn.key("probe"), b"x", 0)
        await conn.call("delete", conn.kv.DeleteRange,
                        rpc.DeleteRangeRequest(key=conn.key("probe")))
        return bool(created)
    except StoreError:
        return False
    finally:
        await conn.close()


async def enable_auth(etcd: TlsEtcd) -> None:
    """A root user with a password, then auth on (what an operator does with etcdctl)."""
    async with grpc.aio.secure_channel(etcd.endpoint, channel_credentials(tls(etcd))) as ch:
        auth = rpc.AuthStub(ch)
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=PASSWORD), timeout=5)
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"),
                                 timeout=5)
        await auth.AuthEnable(rpc.AuthEnableRequest(), timeout=5)


@pytest.mark.timeout(120)
async def test_tls_and_a_client_certificate_are_required_then_user_and_password(
        etcd: TlsEtcd, tmp_path: Path) -> None:
    assert await opens(etcd, EtcdCredentials(tls=tls(etcd)))
    assert not await opens(etcd, EtcdCredentials())  # plaintext
    assert not await opens(etcd, EtcdCredentials(tls=tls(etcd, client_cert=False)))

    await enable_auth(etcd)
    # The certificate alone no longer does (its name is no etcd user); the password does.
    assert not await opens(etcd, EtcdCredentials(tls=tls(etcd)))
    assert not await opens(etcd, EtcdCredentials(tls=tls(etcd), user="root", password="wrong"))
    assert await opens(etcd, EtcdCredentials(tls=tls(etcd), user="root", password=PASSWORD))

    # The same through the config: store.tls, store.user, store.password_file.
    (tmp_path / "etcd-password").write_text(PASSWORD + "\n")
    certs = etcd.certs
    config_path = tmp_path / "torpor.yaml"
    config_path.write_text(f"""
store:
  kind: etcd
  endpoints: ["{etcd.endpoint}"]
  prefix: {PREFIX}
  tls: {{ca: {certs / 'ca.pem'}, cert: {certs / 'envoy.pem'}, key: {certs / 'envoy-key.pem'}}}
  user: root
  password_file: etcd-password
services: []
""")
    coordination = open_coordination(load_config(config_path), "tls-member")
    await coordination.open()  # the store and a lease (a call of each kind: unary, stream)
    try:
        assert await coordination.store.list() == []
    finally:
        await coordination.close()
