"""Where a warm request's CPU goes: torpor's Envoy config against a plain static Envoy,
sampled by the kernel's `cpu-clock` event (`perf record`), which works on VMs without
hardware counters, and covers what callgrind does not see (the kernel, waiting on
shared cache lines between workers).

    python bench/warm_profile.py [--rounds 16] [--duration 2] [--routing host_header]
                                 [--without retry,method_route,...]

Three Envoys on 127.0.0.1, outside `torpor up`: a backend answering every request itself
(`direct_response`, `--concurrency 1`), the plain static Envoy of bench/wake.py part 3 and
torpor's config made static (part 4's `torpor_static_envoy`; `--without` removes parts of
it, see WITHOUT), both `--concurrency 2`. Alternating rounds of `wrk -t1 -c32` per Envoy,
each under `perf record -e cpu-clock` attached to that Envoy. It prints per Envoy the
median req/s and CPU time per request (user + system, /proc), the paired req/s ratio
(median of each round's torpor/plain), perf samples per 1,000 requests by shared object
(Envoy's code, the kernel, libc), and the regions of Envoy's code (16 KB of its address
space: the binary is stripped, so addresses, not names) whose share differs most.

Needs `perf` and `wrk`. Every process it starts is stopped in a finally block; every wait
has a deadline.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wake  # a sibling script: its Envoy configs and wrk parser

LOOPBACK = "127.0.0.1"
HOST = "warm.localhost"
REGION_BITS = 14  # Envoy code regions of 16 KB
START_TIMEOUT = 30.0


def _manager(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    typed: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


def _virtual_hosts(config: dict[str, Any]) -> list[dict[str, Any]]:
    hosts: list[dict[str, Any]] = _manager(config)["route_config"]["virtual_hosts"]
    return hosts


def _drop_routes_matching(header: str) -> Callable[[dict[str, Any]], None]:
    def drop(config: dict[str, Any]) -> None:
        for vhost in _virtual_hosts(config):
            vhost["routes"] = [r for r in vhost["routes"] if not any(
                h["name"] == header for h in r["match"].get("headers", []))]
    return drop


def _no_retry(config: dict[str, Any]) -> None:
    for vhost in _virtual_hosts(config):
        vhost.pop("retry_policy", None)
        for route in vhost["routes"]:
            route.get("route", {}).pop("retry_policy", None)


def _no_retry_predicate(config: dict[str, Any]) -> None:
    for vhost in _virtual_hosts(config):
        for policy in [vhost.get("retry_policy"),
                       *(r.get("route", {}).get("retry_policy") for r in vhost["routes"])]:
            if policy:
                policy.pop("retry_host_predicate", None)
                policy.pop("host_selection_retry_max_attempts", None)


def _no_timeouts(config: dict[str, Any]) -> None:
    _manager(config).pop("stream_idle_timeout", None)
    for vhost in _virtual_hosts(config):
        for route in vhost["routes"]:
            route.get("route", {}).pop("idle_timeout", None)
            route.get("route", {}).pop("timeout", None)


#: Parts of torpor's config `--without` can remove, one change each.
WITHOUT: dict[str, Callable[[dict[str, Any]], None]] = {
    "retry": _no_retry,
    "retry_predicate": _no_retry_predicate,  # a retry may pick the host that failed
    "method_route": _drop_routes_matching(":method"),  # safe replays of idempotent methods
    "prefer_route": _drop_routes_matching("prefer"),  # asynchronous calls
    "normalize": lambda c: [_manager(c).pop(k, None) for k in ("normalize_path",
                                                               "merge_slashes")],
    "remote_address": lambda c: _manager(c).pop("use_remote_address", None),
    "access_log": lambda c: _manager(c).pop("access_log", None),
    "local_reply": lambda c: _manager(c).pop("local_reply_config", None),
    "timeouts": _no_timeouts,
    "stats": lambda c: [c.pop(k, None) for k in ("stats_config", "stats_sinks")],
    "overload": lambda c: c.pop("overload_manager", None),
    "inline_headers": lambda c: c.pop("inline_headers", None),
}


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process `pid`, every thread (wake.cpu_seconds gives
    only their sum)."""
    fields = wake.proc_stat(pid)
    if fields is None:
        raise RuntimeError(f"process {pid} is gone")
    return int(fields[11]) / wake.CLK_TCK, int(fields[12]) / wake.CLK_TCK


@contextlib.contextmanager
def envoys(workdir: Path, configs: dict[str, dict[str, Any]],
           concurrency: dict[str, int]) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Start one Envoy per config; stop them all however the block ends."""
    started: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, config in configs.items():
            path = workdir / f"{name}.json"
            path.write_text(json.dumps(config))
            log = (workdir / f"{name}.log").open("wb")
            started[name] = subprocess.Popen(
                [wake.native_envoy(), "-c", str(path), "--disable-hot-restart",
                 "--concurrency", str(concurrency.get(name, 2)), "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        yield started
    finally:
        for proc in started.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in started.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_answering(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    request = urllib.request.Request(f"http://{LOOPBACK}:{port}/work", headers={"Host": HOST})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Envoy on port {port} exited at start-up")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.1)
    raise RuntimeError(f"Envoy on port {port} did not answer 200 within {START_TIMEOUT:g}s")


def perf_samples(data: Path) -> collections.Counter[tuple[str, str]]:
    """(shared object, symbol or Envoy code region) -> samples, from one perf.data."""
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--sort", "dso,sym",
         "-F", "sample,dso,sym", "--percent-limit", "0"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    samples: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in report.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 3 or line.startswith("#") or not parts[0].isdigit():
            continue
        dso, symbol = parts[1], parts[2].strip()
        if dso == "envoy" and "0x" in symbol:
            address = int(symbol.split("0x")[1].split()[0], 16)
            symbol = f"envoy+{address >> REGION_BITS << REGION_BITS:#x}"
        samples[(dso, symbol)] += int(parts[0])
    return samples


class Round:
    """One Envoy's part of one round: requests, req/s, CPU and perf samples."""

    def __init__(self, requests: int, rps: float, user: float, system: float,
                 samples: collections.Counter[tuple[str, str]]) -> None:
        self.requests, self.rps, self.user, self.system = requests, rps, user, system
        self.samples = samples

    @property
    def cpu_us(self) -> float:
        return (self.user + self.system) / self.requests * 1e6


def one_round(name: str, port: int, pid: int, duration: float, workdir: Path) -> Round:
    data = workdir / f"perf-{name}.data"
    recorder = subprocess.Popen(
        ["perf", "record", "-q", "-e", "cpu-clock", "-F", "2999", "-p", str(pid),
         "-o", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)  # perf attached before the load starts
        user0, system0 = cpu_seconds(pid)
        out = subprocess.run(
            ["wrk", "-t1", "-c32", "--latency", f"-d{duration:g}s", "-H", f"Host: {HOST}",
             f"http://{LOOPBACK}:{port}/work"],
            capture_output=True, text=True, timeout=duration + 60, check=True).stdout
        user1, system1 = cpu_seconds(pid)
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(60)
    load = wake.parse_wrk(out, name)
    if load.non_2xx or load.errors:
        raise RuntimeError(f"{name}: {load.non_2xx} non-2xx, {load.errors} errors")
    return Round(load.requests, load.rps, user1 - user0, system1 - system0,
                 perf_samples(data))


def per_thousand(rounds: list[Round]) -> dict[tuple[str, str], float]:
    requests = sum(r.requests for r in rounds)
    total: collections.Counter[tuple[str, str]] = collections.Counter()
    for r in rounds:
        total.update(r.samples)
    return {key: count / requests * 1000 for key, count in total.items()}


def report(results: dict[str, list[Round]], top: int) -> None:
    plain = results["plain"]
    for name, rounds in results.items():
        print(f"  {name:>8}: {statistics.median(r.rps for r in rounds):8.0f} req/s, CPU "
              f"{statistics.median(r.cpu_us for r in rounds):5.1f} us per request (user "
              f"{statistics.median(r.user / r.requests * 1e6 for r in rounds):5.1f}, system "
              f"{statistics.median(r.system / r.requests * 1e6 for r in rounds):5.1f}), "
              f"median of {len(rounds)} rounds")
    for name, rounds in results.items():
        if name == "plain":
            continue
        paired = statistics.median(t.rps / p.rps for t, p in zip(rounds, plain, strict=True))
        cpu = (statistics.median(r.cpu_us for r in rounds)
               / statistics.median(r.cpu_us for r in plain))
        print(f"  {name}/plain: paired req/s x{paired:.3f}, CPU per request x{cpu:.3f}")
    shares = {name: per_thousand(rounds) for name, rounds in results.items()}
    print("\n  perf samples (cpu-clock, 2999 Hz) per 1,000 requests, by shared object:")
    objects: collections.Counter[str] = collections.Counter()
    for share in shares.values():
        for (dso, _), value in share.items():
            objects[dso] += value
    print("    " + f"{'':20}" + "".join(f"{name:>10}" for name in shares))
    for dso, _ in objects.most_common(5):
        print(f"    {dso[:20]:20}" + "".join(
            f"{sum(v for (d, _), v in share.items() if d == dso):10.2f}"
            for share in shares.values()))
    for name, share in shares.items():
        if name == "plain":
            continue
        keys = set(share) | set(shares["plain"])
        diffs = sorted(keys, key=lambda k: -abs(share.get(k, 0) - shares["plain"].get(k, 0)))
        print(f"\n  where {name} and plain differ most (samples per 1,000 requests):")
        for dso, symbol in diffs[:top]:
            mine, base = share.get((dso, symbol), 0.0), shares["plain"].get((dso, symbol), 0.0)
            print(f"    {symbol[:48]:48} plain {base:6.2f}  {name} {mine:6.2f}  "
                  f"{mine - base:+6.2f}")


def run(args: argparse.Namespace) -> None:
    wake.ROUTING[0] = args.routing
    backend_port, plain_port, torpor_port = (wake.free_port() for _ in range(3))
    configs = {
        "backend": wake.direct_response_envoy(str(backend_port), "profile-backend"),
        "plain": wake.static_envoy(plain_port, backend_port),
    }
    ports = {"plain": plain_port}
    torpor = wake.torpor_static_envoy(torpor_port, backend_port, wake.free_port(),
                                      wake.free_port())
    for part in args.without:
        WITHOUT[part](torpor)
    configs["torpor"], ports["torpor"] = torpor, torpor_port
    with tempfile.TemporaryDirectory(prefix="torpor-warm-profile-") as tmp, \
            envoys(Path(tmp), configs, {"backend": 1}) as procs:
        for name, port in ports.items():
            wait_answering(port, procs[name])
        for name, port in ports.items():  # warm-up: connection pools, first use
            one_round(name, port, procs[name].pid, 1.0, Path(tmp))
        results: dict[str, list[Round]] = {name: [] for name in ports}
        for r in range(args.rounds):
            order = list(ports) if r % 2 == 0 else list(reversed(ports))
            for name in order:
                results[name].append(
                    one_round(name, ports[name], procs[name].pid, args.duration, Path(tmp)))
        print(f"warm_profile: routing {args.routing}, without {args.without or 'nothing'}, "
              f"{args.rounds} alternating rounds of wrk -t1 -c32 -d{args.duration:g}s; "
              f"load average {os.getloadavg()[0]:.2f}")
        report(results, args.top)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per round")
    parser.add_argument("--routing", choices=("virtual_hosts", "host_header"),
                        default="host_header")
    parser.add_argument("--without", type=lambda s: [p for p in s.split(",") if p],
                        default=[], help="parts of torpor's config to remove: "
                        + ",".join(WITHOUT))
    parser.add_argument("--top", type=int, default=12, help="code regions to list")
    args = parser.parse_args(argv)
    unknown = [p for p in args.without if p not in WITHOUT]
    if unknown:
        parser.error(f"unknown --without part(s): {', '.join(unknown)}")
    missing = [tool for tool in ("perf", "wrk") if shutil.which(tool) is None]
    if missing:
        parser.error(f"needs {' and '.join(missing)} on PATH")
    return args


if __name__ == "__main__":
    run(parse_args(sys.argv[1:]))
