"""What checking each service before publishing costs (xds_server/quarantine.py).

    python bench/quarantine_cost.py [--sizes 1000,10000] [--rounds 5]

For each size N it builds the resources of N services with the plain ResourceBuilder and
with the QuarantineBuilder (every service's cluster, endpoints and virtual host checked
against Envoy's rules), and prints, for each: the first build, an endpoint flip of one
service (median of the rounds), and one service added (median). No Envoy, no I/O: only
the time the control plane's event loop is busy. A benchmark prints figures; it never
passes or fails on time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from torpor.model import Endpoint
from xds_server.cache import SnapshotCache
from xds_server.quarantine import QuarantineBuilder
from xds_server.resources import GatewaySettings, ResourceBuilder, RoutedService

SETTINGS = GatewaySettings(listen=Endpoint("127.0.0.1", 8080),
                           activators=(Endpoint("127.0.0.1", 9),))


def table(n: int) -> list[RoutedService]:
    return [RoutedService(f"s{i}", f"s{i}.test",
                          (Endpoint(f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}", 8080),),
                          http2=i % 3 == 0) for i in range(n)]


def timed(step: Callable[[], object]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def measure(make: Callable[[], ResourceBuilder], n: int, rounds: int) -> tuple[float, ...]:
    builder = make()
    services = table(n)
    first = timed(lambda: builder.build(services))
    if isinstance(builder, QuarantineBuilder):  # as after Envoy applied it
        builder.applied(SnapshotCache().set_resources(builder.build(services)))
    flips, adds = [], []
    for r in range(rounds):
        flipped = list(services)
        flipped[n // 2] = RoutedService(f"s{n // 2}", f"s{n // 2}.test",
                                        (Endpoint("10.250.0.1", 9000 + r),))
        flips.append(timed(lambda: builder.build(flipped)))  # noqa: B023
        added = [*flipped, RoutedService(f"new{r}", f"new{r}.test", (Endpoint("10.250.0.2", 80),))]
        adds.append(timed(lambda: builder.build(added)))  # noqa: B023
        builder.build(services)
    return first, statistics.median(flips), statistics.median(adds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{'services':>8}  {'builder':<18}  {'first build':>11}  {'flip':>9}  {'add one':>9}")
    for n in (int(s) for s in args.sizes.split(",")):
        for label, make in (("ResourceBuilder", lambda: ResourceBuilder(SETTINGS)),
                            ("QuarantineBuilder", lambda: QuarantineBuilder(SETTINGS))):
            first, flip, add = measure(make, n, args.rounds)
            print(f"{n:>8}  {label:<18}  {first:>10.3f}s  {flip * 1000:>7.1f}ms  "
                  f"{add * 1000:>7.1f}ms")


if __name__ == "__main__":
    main()
