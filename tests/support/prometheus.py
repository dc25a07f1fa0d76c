"""A real Prometheus server (Debian's `prometheus` package) for tests: its own port from
free_port(), its own data folder, a config written by the test, stopped by `stop()`.
Queried over its HTTP API on loopback."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.support.net import free_port, wait_until

Sample = tuple[dict[str, str], float]


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    assert found, "the prometheus server is missing: apt-get install prometheus " \
                  "(scripts/tools.sh installs it when it can)"
    return found


class Prometheus:
    """`jobs`: job name -> (metrics path, ["host:port", ...]); `rules`: rule files."""

    def __init__(self, workdir: Path, jobs: dict[str, tuple[str, list[str]]],
                 rules: list[Path], every: str = "1s") -> None:
        self.dir = workdir / "prometheus"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": every, "scrape_timeout": every,
                       "evaluation_interval": every},
            "rule_files": [str(r) for r in rules],
            "scrape_configs": [
                {"job_name": job, "metrics_path": path, "static_configs": [{"targets": targets}]}
                for job, (path, targets) in jobs.items()],
        }))
        self.log = self.dir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [prometheus_binary(), f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def _get(self, path: str, **params: str) -> Any:
        async with aiohttp.ClientSession() as session, \
                session.get(self.url + path, params=params,
                            timeout=aiohttp.ClientTimeout(total=10)) as response:
            body = await response.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    async def wait_ready(self, timeout: float = 30) -> None:
        async def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.text()[-3000:]}")
            try:
                async with aiohttp.ClientSession() as session, \
                        session.get(self.url + "/-/ready") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(ready, timeout, "prometheus ready")

    async def query(self, expr: str) -> list[Sample]:
        """An instant query now: [(labels without __name__, value)] (NaN kept)."""
        data = await self._get("/api/v1/query", query=expr)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [({k: v for k, v in r["metric"].items() if k != "__name__"},
                 float(r["value"][1])) for r in data["result"]]

    async def targets_up(self) -> dict[str, bool]:
        """"job instance" -> whether its last scrape worked."""
        data = await self._get("/api/v1/targets")
        return {f"{t['labels']['job']} {t['labels']['instance']}": t["health"] == "up"
                for t in data["activeTargets"]}

    async def alerts(self) -> dict[str, str]:
        """alertname -> state (pending, firing) of the alerts active now."""
        data = await self._get("/api/v1/alerts")
        return {a["labels"]["alertname"]: a["state"] for a in data["alerts"]}

    async def rule_groups(self) -> list[str]:
        data = await self._get("/api/v1/rules")
        return [g["name"] for g in data["groups"]]


def finite(value: float) -> bool:
    return not math.isnan(value) and not math.isinf(value)
