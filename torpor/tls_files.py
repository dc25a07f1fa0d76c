"""A certificate and its key from PEM files, checked to belong together.

Owns reading what the gateway serves over TLS (gateway.tls): the config checks the files
at start and the control plane reads them again when they change, so that a file Envoy
would refuse (a key of another certificate, a truncated PEM) is an error that names the
file, never a listener that stops accepting connections.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization


@dataclasses.dataclass(frozen=True)
class CertificatePair:
    """The PEM bytes of a certificate chain and its private key, and a short digest of
    both (what tells a changed file apart)."""

    chain: bytes
    key: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.chain + b"\0" + self.key).hexdigest()[:16]


def read_certificate(cert: Path, key: Path) -> CertificatePair:
    """Both files, checked: PEM, parseable, and the key is the certificate's. Raises
    ValueError saying which file and why."""
    try:
        chain, private = cert.read_bytes(), key.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None
    try:
        leaf = x509.load_pem_x509_certificates(chain)[0]
    except ValueError as exc:
        raise ValueError(f"{cert} is not a PEM certificate: {exc}") from None
    try:
        loaded = serialization.load_pem_private_key(private, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{key} is not an unencrypted PEM private key: {exc}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.PEM
    if (loaded.public_key().public_bytes(encoding, public)
            != leaf.public_key().public_bytes(encoding, public)):
        raise ValueError(f"{key} is not the key of the certificate in {cert}")
    return CertificatePair(chain, private)
