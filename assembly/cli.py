"""The `torpor` command line: the verbs of docs/architecture.md.

Owns: argument parsing, turning torpor errors into one clear line and an exit code
(2 for bad input such as a bad config, 1 for a failure at run time), and choosing what
each verb runs. Every verb takes `--config FILE` and finds the addresses it needs there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from torpor import admin_client
from torpor.config import Address, Config, load_config
from torpor.errors import ConfigError, TorporError
from torpor.logs import setup_logging

if TYPE_CHECKING:  # the handlers import what their verb runs, and nothing more
    from assembly.components import Assembly

DEFAULT_CONFIG = "torpor.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        setup_logging(args.log_level)
        handler: Callable[[argparse.Namespace, Config], int] = args.handler
        return handler(args, config)
    except ConfigError as exc:
        print(f"torpor: config error: {exc}", file=sys.stderr)
        return 2
    except admin_client.AdminError as exc:
        print(f"torpor: {exc}", file=sys.stderr)
        return 1
    except TorporError as exc:
        print(f"torpor: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torpor", description=__doc__.splitlines()[0])
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

    verb("up", _up, "run the whole gateway on this machine until Ctrl-C")
    xds = verb("xds-server", _xds_server,
               "run only the control plane (xDS, access logs, admin API)", log_level="info")
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
    bootstrap = verb("envoy-bootstrap", _envoy_bootstrap,
                     "print the Envoy bootstrap that points at the control plane")
    bootstrap.add_argument("--xds-address", type=_host_port, metavar="HOST:PORT",
                           help="where Envoy dials the control plane, e.g. a Kubernetes "
                                "Service name (default: control_plane.xds)")
    bootstrap.add_argument("--admin-address", type=_host_port, metavar="HOST:PORT",
                           help="where Envoy's admin listener binds (default: gateway.admin)")
    return parser


def _host_port(text: str) -> Address:
    """HOST:PORT for an address given on the command line (argparse type)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port 1..65535, got {text!r}")
    return Address(host, int(port))


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
    """Run one component until SIGINT/SIGTERM; a clean stop revokes this process's lease,
    so its leadership, locks and registration go at once."""

    async def run() -> int:
        try:
            await assembly.start()
            await _until_signal()
        finally:
            await assembly.close()
        return 0

    return asyncio.run(run())


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _status(args: argparse.Namespace, config: Config) -> int:
    statuses, problems = admin_client.list_services(str(config.control_plane.admin_api))
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
    result = admin_client.hibernate(str(config.control_plane.admin_api), args.name, timeout)
    print(admin_client.format_status_table([result]))
    return 0


def _wake(args: argparse.Namespace, config: Config) -> int:
    timeout = config.activator.wake_timeout + 30
    result = admin_client.wake(str(config.control_plane.admin_api), args.name, timeout)
    print(admin_client.format_status_table([result]))
    return 0


def _envoy_bootstrap(args: argparse.Namespace, config: Config) -> int:
    from xds_server.bootstrap import bootstrap_json

    print(bootstrap_json(config, xds=args.xds_address, admin=args.admin_address))
    return 0


if __name__ == "__main__":
    sys.exit(main())
