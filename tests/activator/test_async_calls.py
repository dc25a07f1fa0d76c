"""Asynchronous calls: which requests ask for them, and the spool that keeps them — bounded
in age and count, and never losing a call silently (a restart fails what was running)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from activator.async_calls import DONE, FAILED, RUNNING, ResultSpool
from torpor.async_calls import call_id_of, wants_async


@pytest.mark.parametrize(("headers", "expected"), [
    ({"Prefer": "respond-async"}, True),
    ({"prefer": "Respond-Async"}, True),
    ({"Prefer": "wait=10, respond-async"}, True),
    ({"Prefer": "respond-async; x=1"}, True),
    ({"Prefer": "return=minimal"}, False),
    ({"Prefer": "respond-asynchronously"}, False),
    ({"X-Prefer": "respond-async"}, False),
    ({}, False),
])
def test_which_requests_prefer_an_asynchronous_answer(headers: dict[str, str],
                                                      expected: bool) -> None:
    assert wants_async(headers) is expected


@pytest.mark.parametrize(("path", "expected"), [
    ("/.torpor/async/abc", "abc"), ("/.torpor/async/", None), ("/.torpor/async/a/b", None),
    ("/predict", None), ("/.torpor/asyncabc", None),
])
def test_the_call_id_of_a_status_path(path: str, expected: str | None) -> None:
    assert call_id_of(path) == expected


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_call_runs_then_keeps_its_answer_until_its_ttl(tmp_path: Path) -> None:
    clock = Clock()
    spool = ResultSpool(tmp_path, ttl=60, max_calls=10, clock=clock)
    spool.open()
    call = spool.create("echo")
    assert len(call.id) >= 20 and spool.get(call.id) == call and call.state == RUNNING
    spool.finish(call.id, 201, {"content-type": "text/plain"}, b"made")
    done = spool.get(call.id)
    assert done is not None and (done.state, done.status, done.headers) == (
        DONE, 201, {"content-type": "text/plain"})
    assert spool.body(call.id) == b"made"
    clock.now += 61
    assert spool.get(call.id) is None
    assert list(tmp_path.iterdir()) == []  # expired calls leave nothing behind


def test_a_restart_fails_the_calls_that_were_running_and_says_so(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path, ttl=60, max_calls=10)
    spool.open()
    running, finished = spool.create("echo"), spool.create("echo")
    spool.finish(finished.id, 200, {}, b"ok")
    again = ResultSpool(tmp_path, ttl=60, max_calls=10)
    again.open()
    failed = again.get(running.id)
    assert failed is not None and (failed.state, failed.status) == (FAILED, 503)
    assert "stopped while the call ran" in json.loads(again.body(running.id))["message"]
    kept = again.get(finished.id)
    assert kept is not None and kept.state == DONE and again.body(finished.id) == b"ok"


def test_at_most_max_calls_are_kept(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path, ttl=60, max_calls=2)
    spool.open()
    spool.create("a")
    spool.create("a")
    with pytest.raises(OverflowError, match="async_max_calls"):
        spool.create("a")


def test_ids_that_are_not_calls_find_nothing(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path, ttl=60, max_calls=2)
    spool.open()
    assert spool.get("../etc") is None and spool.get(".x") is None and spool.get("") is None
