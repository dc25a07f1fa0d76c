"""`torpor certs`: a small local CA and the certificates of mTLS between Envoy and the
control plane (ADS and access logs).

Owns: making the CA, the control plane's server certificate (its names: localhost,
127.0.0.1 and the `--host` names Envoys dial, e.g. a Kubernetes Service) and Envoy's client
certificate, and writing them as PEM files (keys mode 0600, never overwritten unless
asked). Enough for one gateway or one cluster; an organisation's own PKI (or
cert-manager) can issue the same files instead. Needs the `cryptography` package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from torpor.errors import TorporError

#: What `torpor certs --out DIR` writes (file name → what it is).
FILES = {
    "ca.pem": "the CA: control_plane.tls.client_ca and gateway.xds_tls.ca",
    "ca-key.pem": "the CA's key: keep it offline; only needed to issue more certificates",
    "server.pem": "control_plane.tls.cert",
    "server-key.pem": "control_plane.tls.key",
    "envoy.pem": "gateway.xds_tls.cert (Envoy's client certificate)",
    "envoy-key.pem": "gateway.xds_tls.key",
}
DEFAULT_HOSTS = ("localhost", "127.0.0.1")


@dataclasses.dataclass(frozen=True)
class Issued:
    """One certificate and its key, PEM-encoded."""

    cert: bytes
    key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "torpor"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(days: int, now: datetime.datetime | None = None) -> tuple[Issued, x509.Certificate,
                                                                      ec.EllipticCurvePrivateKey]:
    """A self-signed CA: (its PEM files, the certificate and key to sign with)."""
    start = now or datetime.datetime.now(datetime.UTC)
    key = _key()
    name = _name("torpor CA")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start - datetime.timedelta(minutes=5))
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)), cert, key


def issue(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str,
          hosts: Sequence[str], client: bool, days: int,
          now: datetime.datetime | None = None) -> Issued:
    """A leaf certificate signed by the CA: for a server (names `hosts`) or a client."""
    start = now or datetime.datetime.now(datetime.UTC)
    key = _key()
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(common_name))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start - datetime.timedelta(minutes=5))
               .not_valid_after(start + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if hosts:
        builder = builder.add_extension(_alt_names(hosts), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def make_certs(hosts: Sequence[str] = (), days: int = 365) -> dict[str, bytes]:
    """The contents of every file of FILES: a new CA, the control plane's certificate for
    DEFAULT_HOSTS + `hosts`, and Envoy's client certificate."""
    ca, ca_cert, ca_key = make_ca(days)
    names = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    server = issue(ca_cert, ca_key, "torpor-control-plane", names, client=False, days=days)
    envoy = issue(ca_cert, ca_key, "torpor-envoy", (), client=True, days=days)
    return {"ca.pem": ca.cert, "ca-key.pem": ca.key, "server.pem": server.cert,
            "server-key.pem": server.key, "envoy.pem": envoy.cert, "envoy-key.pem": envoy.key}


def write_certs(out: Path, files: dict[str, bytes], force: bool = False) -> list[Path]:
    """Write `files` into `out` (created 0700 if missing); keys mode 0600, certificates
    0644. Raises TorporError if a file exists and not `force`: a new CA would silently
    invalidate every certificate already handed out."""
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    existing = [name for name in files if (out / name).exists()]
    if existing and not force:
        raise TorporError(f"{out} already holds {', '.join(existing)}; pass --force to "
                          "replace them (every certificate of the old CA stops working)")
    written = []
    for name, content in files.items():
        path = out / name
        mode = 0o600 if name.endswith("-key.pem") else 0o644
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        written.append(path)
    return written
