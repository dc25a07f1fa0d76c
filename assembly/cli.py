"""The `torpor` command line: the verbs of docs/architecture.md.

Owns: argument parsing, turning torpor errors into one clear line and an exit code
(2 for bad input such as a bad config, 1 for a failure at run time), and choosing what
each verb runs. Every verb takes `--config FILE` and finds the addresses it needs there.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import importlib.metadata
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torpor
from torpor import admin_client
from torpor.config import Address, Config, load_config, parse_duration
from torpor.credentials import AdminTarget, admin_target
from torpor.errors import ConfigError, TorporError
from torpor.logs import event, setup_logging
from torpor.supervision import AlreadyRunningError
from torpor.wording import for_people

if TYPE_CHECKING:  # the handlers import what their verb runs, and nothing more
    from assembly.components import Assembly

DEFAULT_CONFIG = "torpor.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.handler is None:  # a verb that needs no config (policy replay)
            standalone: Callable[[argparse.Namespace], int] = args.standalone
            return standalone(args)
        config = load_config(args.config)
        setup_logging(args.log_level)
        handler: Callable[[argparse.Namespace, Config], int] = args.handler
        return handler(args, config)
    except ConfigError as exc:
        print(f"torpor: config error: {exc}", file=sys.stderr)
        return 2
    except AlreadyRunningError as exc:
        print(f"torpor: error: {exc}", file=sys.stderr)
        return 2
    except admin_client.AdminError as exc:
        print(f"torpor: {exc}", file=sys.stderr)
        return 1
    except TorporError as exc:
        print(f"torpor: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _version() -> str:
    """The installed distribution's version (what pip knows), else the package's own."""
    try:
        return importlib.metadata.version("torpor")
    except importlib.metadata.PackageNotFoundError:
        return torpor.__version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torpor", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"torpor {_version()}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, handler: Callable[[argparse.Namespace, Config], int], text: str,
             log_level: str = "warning") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                       help=f"torpor config (default: {DEFAULT_CONFIG})")
        p.add_argument("--log-level", default=log_level,
                       choices=["debug", "info", "warning", "error"],
                       help=f"JSON logs on stderr at this level (default: {log_level})")
        p.set_defaults(handler=handler)
        return p

    verb("up", _up, "run the whole gateway on this machine until Ctrl-C; SIGHUP or a "
                    "change of the config file reloads it (services and policy at once, "
                    "other settings at the next start)")
    xds = verb("xds-server", _xds_server,
               "run only the control plane (xDS, access logs, admin API); SIGHUP or a "
               "change of the config file reloads it", log_level="info")
    activator = verb("activator", _activator, "run only the activator", log_level="info")
    for p in (xds, activator):
        p.add_argument("--member", metavar="NAME",
                       help="this process's name in an etcd fleet (lock holder, leader, "
                            "statistics writer; default: store.member, else host-pid)")
    activator.add_argument("--advertise", metavar="HOST",
                           help="the address Envoy reaches this activator at, e.g. the pod "
                                "IP (default: activator.advertise, else the listen host)")
    status = verb("status", _status, "show every service's state")
    status.add_argument("--json", action="store_true", help="print a JSON list")
    for name, text in (("hibernate", "put a service to sleep now"),
                       ("wake", "wake a sleeping service now")):
        p = verb(name, _hibernate if name == "hibernate" else _wake, text)
        p.add_argument("name", metavar="NAME", help="service name")
    traffic = verb("traffic", _traffic,
                   "split a service's traffic between its versions, e.g. v1=90 v2=10 "
                   "(relative weights; a version not named gets 0), in one push")
    traffic.add_argument("name", metavar="NAME", help="service name")
    traffic.add_argument("weights", nargs="+", metavar="VERSION=WEIGHT", type=_weight)
    promote = verb("promote", _promote, "send all of a service's traffic to one version "
                   "(blue/green), in one push")
    promote.add_argument("name", metavar="NAME", help="service name")
    promote.add_argument("version", metavar="VERSION", help="the version to promote")
    rollback = verb("rollback", _rollback, "back to the split before the last change, in "
                    "one push")
    rollback.add_argument("name", metavar="NAME", help="service name")
    register = verb("register", _register,
                    "add a service at run time, kept in the store (the config file wins a "
                    "name clash; needs the operator token)")
    register.add_argument("name", metavar="NAME", help="service name")
    register.add_argument("--host", required=True, metavar="HOST",
                          help="the Host header it answers, e.g. echo.localhost")
    register.add_argument("--replicas", type=int, metavar="N",
                          help="replicas while ACTIVE (default: 1)")
    register.add_argument("--command", metavar="COMMAND",
                          help="workloads.kind local: the command that starts one replica, "
                               "one string split as a shell would, \"{port}\" replaced by "
                               "its port, e.g. 'python -m torpor.examples.model_server "
                               "--port {port}'")
    register.add_argument("--ready-path", metavar="PATH",
                          help="local: the readiness path (default: /healthz)")
    register.add_argument("--ready-probe", choices=["http", "tcp"],
                          help="local: http (GET the ready path) or tcp (default: http)")
    register.add_argument("--namespace", metavar="NS",
                          help="workloads.kind kubernetes: the Deployment's namespace")
    register.add_argument("--deployment", metavar="NAME",
                          help="kubernetes: the Deployment that runs the replicas")
    register.add_argument("--port", type=int, metavar="PORT",
                          help="kubernetes: the port the replicas listen on")
    register.add_argument("--protocol", choices=["http1", "http2"],
                          help="what the replicas speak (default: http1)")
    register.add_argument("--never-sleep", action="store_true",
                          help="never hibernated by the policy")
    register.add_argument("--spec", metavar="JSON",
                          help="more keys of the service's `services:` entry as a JSON "
                               "object, e.g. '{\"policy\": {\"idle_after\": \"30m\"}}'")
    unregister = verb("unregister", _unregister,
                      "remove a registered service: its route, then its replicas (needs "
                      "the operator token)")
    unregister.add_argument("name", metavar="NAME", help="service name")
    report = verb("report", _report, "what sleeping saved and what waking cost, per service")
    report.add_argument("--json", action="store_true",
                        help='print {"services": [...], "total": {...}, "since", "generated_at"}')
    report.add_argument("--since", type=_duration, metavar="DURATION",
                        help="only the last DURATION (e.g. 1h, 7d; whole hours, whole days "
                             "beyond two days; default: everything the ledger holds)")
    bootstrap = verb("envoy-bootstrap", _envoy_bootstrap,
                     "print the Envoy bootstrap that points at the control plane")
    bootstrap.add_argument("--xds-address", type=_host_port, metavar="HOST:PORT",
                           help="where Envoy dials the control plane, e.g. a Kubernetes "
                                "Service name (default: control_plane.xds)")
    bootstrap.add_argument("--admin-address", type=_host_port, metavar="HOST:PORT",
                           help="where Envoy's admin listener binds (default: gateway.admin)")

    text = ("make a local CA and the certificates of mTLS between Envoy and the control "
            "plane (needs no config)")
    certs = sub.add_parser("certs", help=text, description=text)
    certs.add_argument("--out", required=True, metavar="DIR",
                       help="folder to write ca.pem, server.pem, envoy.pem and their keys to")
    certs.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="another name or IP the control plane's certificate is valid "
                            "for, e.g. the Service Envoys dial (repeatable; localhost and "
                            "127.0.0.1 are always in)")
    certs.add_argument("--days", type=int, default=365, metavar="N",
                       help="validity in days (default: 365)")
    certs.add_argument("--force", action="store_true", help="replace existing files")
    certs.set_defaults(handler=None, standalone=_certs)

    policy = sub.add_parser("policy", help="evaluate idle policies offline",
                            description="evaluate idle policies offline")
    policy_sub = policy.add_subparsers(dest="policy_verb", required=True, metavar="VERB")
    text = ("replay recorded traces through the fixed timers and the learning policy: cold "
            "starts against loaded-idle time (needs no config and no running gateway)")
    replay = policy_sub.add_parser(
        "replay", help=text, description=text,
        epilog="Each PATH is one trace. --json prints {\"trace\": {...}, \"rows\": [...]} for "
               "one PATH and a JSON list of such objects for several.")
    replay.add_argument("paths", nargs="+", metavar="PATH",
                        help="servegen: a folder of chunk-*-trace.csv (or one file); "
                             "azure-functions: a *_inv.csv file (or its folder)")
    replay.add_argument("--format", required=True, choices=["servegen", "azure-functions"],
                        help="the traces' format")
    replay.add_argument("--json", action="store_true", help="print JSON instead of tables")
    replay.add_argument("--plot", metavar="FILE.png",
                        help="also draw cold starts against loaded-idle time, one panel per "
                             "trace (needs torpor[plot])")
    replay.set_defaults(handler=None, standalone=_policy_replay)
    return parser


def _host_port(text: str) -> Address:
    """HOST:PORT for an address given on the command line (argparse type)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port 1..65535, got {text!r}")
    return Address(host, int(port))


def _duration(text: str) -> float:
    """A positive duration on the command line (argparse type): 30m, 24h, 7d, or seconds."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive duration, got {text!r}")
    return seconds


def _up(args: argparse.Namespace, config: Config) -> int:
    from assembly.up import run_up

    return asyncio.run(run_up(config))


def _xds_server(args: argparse.Namespace, config: Config) -> int:
    from assembly.components import Assembly, Role

    return _run_role(Assembly(config, Role.XDS_SERVER, member=args.member))


def _activator(args: argparse.Namespace, config: Config) -> int:
    from assembly.components import Assembly, Role

    return _run_role(Assembly(config, Role.ACTIVATOR, member=args.member,
                              advertise=args.advertise))


def _run_role(assembly: Assembly) -> int:
    """Run one component until SIGINT/SIGTERM; an activator then drains (no new requests,
    held ones finish within `activator.drain_grace`). A control plane reloads its config
    on SIGHUP and when the file changes (assembly/reload.py). A clean stop revokes this process's
    lease, so its leadership, locks and registration go at once."""

    async def run() -> int:
        from assembly.reload import ConfigReloader

        reloader = ConfigReloader(assembly.config, assembly.apply_reload)
        # SIGHUP reloads a control plane; it never stops a process (its default action).
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, reloader.request if assembly.runs_control_plane else
            lambda: event(logging.getLogger("torpor.reload"), "config.reload_not_supported",
                          level=logging.WARNING, role=assembly.role.value,
                          why="an activator's services come from the control plane (or "
                              "discovery and the store); restart it for other settings"))
        reloading: asyncio.Task[None] | None = None
        try:
            await assembly.start()
            if assembly.runs_control_plane:
                reloading = asyncio.create_task(reloader.run())
            await _until_signal(again=assembly.end_grace)
            await assembly.drain()
        finally:
            if reloading is not None:
                reloading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reloading
            await assembly.close()
        return 0

    return asyncio.run(run())


async def _until_signal(again: Callable[[], None] = lambda: None) -> None:
    """Until SIGINT/SIGTERM; each later one calls `again` (ends a drain's grace)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            again()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()


def _status(args: argparse.Namespace, config: Config) -> int:
    statuses, problems = admin_client.list_services(admin_target(config))
    if args.json:
        print(json.dumps(statuses, indent=2))
    else:
        print(admin_client.format_status_table(statuses))
    for problem in problems:  # on stderr, so that --json stays one JSON document
        print(f"problem: {problem}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _hibernate(args: argparse.Namespace, config: Config) -> int:
    # Waits for every Envoy to apply the switch, and for a wake in progress to finish.
    timeout = config.activator.wake_timeout + 3 * config.control_plane.ack_timeout + 30
    result = admin_client.hibernate(admin_target(config), args.name, timeout)
    print(admin_client.format_status_table([result]))
    return 0


#: How often `torpor wake` looks at the service while the wake runs.
WAKE_PROGRESS_EVERY = 1.0


def _wake(args: argparse.Namespace, config: Config) -> int:
    """Wake, saying how far the wake is while it runs (replicas ready of those recorded,
    elapsed) on stderr, then the status table."""
    target = admin_target(config)
    timeout = config.activator.wake_timeout + 30
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        waking = pool.submit(admin_client.wake, target, args.name, timeout)
        started = time.monotonic()
        said = ""
        while True:
            try:
                result = waking.result(timeout=WAKE_PROGRESS_EVERY)
                break
            except concurrent.futures.TimeoutError:
                line = _wake_progress(target, args.name, time.monotonic() - started)
                if line and line != said:
                    print(line, file=sys.stderr, flush=True)
                    said = line
    print(admin_client.format_status_table([result]))
    return 0


def _wake_progress(target: AdminTarget, name: str, elapsed: float) -> str:
    """One progress line of a running wake ('' when the status cannot be read now: the
    wake itself says what went wrong)."""
    try:
        status = admin_client.get_status(target, name, timeout=2.0)
    except admin_client.AdminError:
        return ""
    ready = len(status.get("ready_endpoints") or ())
    line = (f"waking {name}: {ready} of {status['recorded_replicas']} replicas ready, "
            f"{for_people(elapsed)}")
    problem = status.get("replica_problem")
    return f"{line}; {problem}" if problem else line


def _weight(text: str) -> tuple[str, int]:
    version, equals, weight = text.partition("=")
    if not equals or not version or not weight.isdigit():
        raise argparse.ArgumentTypeError(f"expected VERSION=WEIGHT (e.g. v2=10), got {text!r}")
    return version, int(weight)


def _traffic(args: argparse.Namespace, config: Config) -> int:
    weights = dict(args.weights)
    if len(weights) != len(args.weights):
        raise TorporError("a version is named twice")
    return _print_traffic(admin_client.set_traffic(admin_target(config), args.name, weights))


def _promote(args: argparse.Namespace, config: Config) -> int:
    return _print_traffic(admin_client.promote(admin_target(config), args.name, args.version))


def _rollback(args: argparse.Namespace, config: Config) -> int:
    return _print_traffic(admin_client.rollback(admin_target(config), args.name))


def _print_traffic(change: dict[str, Any]) -> int:
    """`NAME: v1=90 v2=10 (was v1=100 v2=0); applied by every Envoy in 12 ms`."""
    def split(weights: dict[str, int] | None) -> str:
        return " ".join(f"{v}={w}" for v, w in sorted((weights or {}).items()))

    was = f" (was {split(change['previous'])})" if change["previous"] else ""
    applied = "applied by every Envoy" if change["applied"] else \
        "pushed; not every Envoy applied it in time"
    print(f"{change['name']}: {split(change['weights'])}{was}; {applied} in "
          f"{change['push_seconds'] * 1000:.0f} ms")
    return 0 if change["applied"] else 1


def register_spec(args: argparse.Namespace) -> dict[str, object]:
    """The `services:` entry (without name and host) the register options describe.
    Raises ValueError for a --spec that is not a JSON object or a --command that does not
    split."""
    spec: dict[str, object] = {}
    if args.spec:
        extra = json.loads(args.spec)
        if not isinstance(extra, dict):
            raise ValueError("--spec must be a JSON object")
        spec.update(extra)
    if args.replicas is not None:
        spec["replicas"] = args.replicas
    if args.protocol:
        spec["protocol"] = args.protocol
    if args.never_sleep:
        spec["never_sleep"] = True
    local = {key: value for key, value in (
        ("command", shlex.split(args.command) if args.command else None),
        ("ready_path", args.ready_path), ("ready_probe", args.ready_probe))
        if value is not None}
    if local:
        spec["local"] = local
    kubernetes = {key: value for key, value in (
        ("namespace", args.namespace), ("deployment", args.deployment), ("port", args.port))
        if value is not None}
    if kubernetes:
        spec["kubernetes"] = kubernetes
    return spec


def _register(args: argparse.Namespace, config: Config) -> int:
    try:
        spec = register_spec(args)
    except ValueError as exc:
        print(f"torpor: register: {exc}", file=sys.stderr)
        return 2
    status = admin_client.register(admin_target(config), args.name, args.host, spec,
                                   timeout=config.control_plane.ack_timeout + 30)
    print(f"registered {args.name} (kept in the store; `torpor unregister {args.name}` "
          "removes it)")
    print(admin_client.format_status_table([status]))
    return 0


def _unregister(args: argparse.Namespace, config: Config) -> int:
    admin_client.unregister(admin_target(config), args.name,
                            timeout=config.control_plane.ack_timeout + 30)
    print(f"unregistered {args.name}")
    return 0


def _report(args: argparse.Namespace, config: Config) -> int:
    from torpor.report import format_report_table, report_json

    response = admin_client.report(admin_target(config), args.since)
    document = report_json(response, args.since)
    print(json.dumps(document, indent=2) if args.json else format_report_table(document))
    return 0


def _envoy_bootstrap(args: argparse.Namespace, config: Config) -> int:
    from xds_server.bootstrap import bootstrap_json

    print(bootstrap_json(config, xds=args.xds_address, admin=args.admin_address))
    return 0


def _certs(args: argparse.Namespace) -> int:
    from torpor.certs import FILES, make_certs, write_certs

    if not 1 <= args.days <= 3650:
        print(f"torpor: --days must be from 1 to 3650, got {args.days}", file=sys.stderr)
        return 2
    try:
        written = write_certs(Path(args.out), make_certs(args.host, args.days), args.force)
    except TorporError as exc:
        print(f"torpor: error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"{path}  {FILES[path.name]}")
    return 0


def _policy_replay(args: argparse.Namespace) -> int:
    from assembly.replay_report import PlotError, check_plot_available, format_report, plot
    from assembly.traces import TraceError, read_trace
    from policies.replay import sweep

    try:  # bad input: exit code 2, before a replay that can take a while
        if args.plot:
            check_plot_available()
            folder = os.path.dirname(os.path.abspath(args.plot))
            if not os.path.isdir(folder):
                raise PlotError(f"{args.plot}: no folder {folder} to write the plot in")
        traces = [read_trace(path, args.format) for path in args.paths]
    except (TraceError, PlotError) as exc:
        print(f"torpor: {exc}", file=sys.stderr)
        return 2
    results = []
    for loaded in traces:
        trace = loaded.trace
        with _progress(f"replaying {trace.name}: {len(trace.services)} services x "
                       f"{trace.windows} windows..."):
            results.append((loaded, sweep(trace)))
    if args.json:
        documents = [{"trace": loaded.summary(), "rows": [row.as_json() for row in rows]}
                     for loaded, rows in results]
        print(json.dumps(documents[0] if len(documents) == 1 else documents, indent=2))
    else:
        print("\n\n".join(format_report(loaded, rows) for loaded, rows in results))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


@contextlib.contextmanager
def _progress(text: str, after: float = 1.0) -> Iterator[None]:
    """Print `text` on stderr if the block takes longer than `after` seconds, and then how
    long it took."""
    started = time.monotonic()
    shown = threading.Event()

    def show() -> None:
        print(f"torpor: {text}", file=sys.stderr, flush=True)
        shown.set()

    timer = threading.Timer(after, show)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if shown.is_set():
            print(f"torpor: done in {time.monotonic() - started:.1f} s", file=sys.stderr,
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
