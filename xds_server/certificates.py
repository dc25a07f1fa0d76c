"""The gateway's TLS certificates: read from their files, sent to Envoy over SDS, and
sent again when a file changes (a renewal needs no restart and no listener change).

Owns: which SDS secret holds which certificate (`secret_names`), reading and checking the
files (torpor/tls_files.py), and watching them. A file that cannot be read or does not
match its key keeps the certificate Envoy has, and says why (log `tls.reload_failed`,
metric `torpor_tls_reloads_total{result}`), never a listener without a certificate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from torpor import metrics
from torpor.config import GatewayTlsConfig
from torpor.logs import event
from torpor.tls_files import CertificatePair, read_certificate
from xds_server.resources import ListenerTls

log = logging.getLogger("torpor.tls")

DEFAULT_SECRET = "torpor_gateway_cert"


def secret_names(tls: GatewayTlsConfig) -> dict[str, tuple[Path, Path]]:
    """SDS secret name → (certificate file, key file): the default, then one per SNI entry."""
    names = {DEFAULT_SECRET: (tls.cert, tls.key)}
    for index, entry in enumerate(tls.sni):
        names[f"{DEFAULT_SECRET}_{index}"] = (entry.cert, entry.key)
    return names


def listener_tls(tls: GatewayTlsConfig | None) -> ListenerTls | None:
    """What the listener needs to know: which secret for which server names."""
    if tls is None:
        return None
    return ListenerTls(default_secret=DEFAULT_SECRET, http2=tls.http2,
                       sni=tuple((entry.hosts, f"{DEFAULT_SECRET}_{index}")
                                 for index, entry in enumerate(tls.sni)))


class CertificateWatcher:
    """Reads the certificates now and whenever their files change (checked every
    `every` seconds), handing each new set to `apply(name → (chain, key))`."""

    def __init__(self, tls: GatewayTlsConfig,
                 apply: Callable[[dict[str, tuple[bytes, bytes]]], None],
                 every: float = 2.0) -> None:
        self._files = secret_names(tls)
        self._apply = apply
        self._every = every
        self._current: dict[str, CertificatePair] = {}

    def load(self) -> None:
        """The first read (the config check read them already: a failure here is a file
        changed since, and stops the start with its reason)."""
        pairs = {name: read_certificate(cert, key) for name, (cert, key) in self._files.items()}
        self._current = pairs
        self._apply({name: (p.chain, p.key) for name, p in pairs.items()})

    def check(self) -> bool:
        """Read the files again; True when a certificate changed and was applied."""
        changed = {}
        for name, (cert, key) in self._files.items():
            try:
                pair = read_certificate(cert, key)
            except ValueError as exc:
                if self._current.get(name) is not None:
                    event(log, "tls.reload_failed", level=logging.ERROR, secret=name,
                          error=str(exc), kept=self._current[name].digest)
                    metrics.TLS_RELOADS.labels(result="failed").inc()
                continue
            if self._current.get(name) != pair:
                changed[name] = pair
        if not changed:
            return False
        self._current.update(changed)
        for name, pair in changed.items():
            event(log, "tls.reloaded", secret=name, certificate=pair.digest)
        metrics.TLS_RELOADS.labels(result="applied").inc()
        self._apply({name: (p.chain, p.key) for name, p in self._current.items()})
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            self.check()
