"""What a drain reads from Envoy's admin `/stats?format=json` to know it answers nothing
more (assembly/envoy_process.active_requests)."""

from __future__ import annotations

from assembly.envoy_process import active_requests


def test_requests_in_flight_are_summed_over_listeners_but_not_the_admin() -> None:
    stats: list[dict[str, object]] = [
        {"name": "http.torpor.downstream_rq_active", "value": 2},
        {"name": "http.edge.downstream_rq_active", "value": 1},
        {"name": "http.admin.downstream_rq_active", "value": 1},  # the asking request
        {"name": "http.torpor.downstream_rq_total", "value": 90},
    ]
    assert active_requests(stats) == 3


def test_no_listener_stats_means_nothing_in_flight() -> None:
    assert active_requests([]) == 0
    assert active_requests([{"name": "http.admin.downstream_rq_active", "value": 1}]) == 0
