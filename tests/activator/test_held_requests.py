"""Admission of held requests: a bounded queue per service and a bound for the activator."""

from __future__ import annotations

import contextlib

import pytest

from activator.holding import HeldRequests, QueueFullError


def test_the_activator_wide_bound_refuses_the_next_request_of_any_service() -> None:
    held = HeldRequests(max_per_service=3, max_total=4)
    with contextlib.ExitStack() as slots:
        for name in ("a", "a", "b", "c"):
            slots.enter_context(held.slot(name))
        assert held.total() == 4
        with pytest.raises(QueueFullError, match=r"activator\.max_held"):
            with held.slot("d"):
                pass
        assert (held.total(), held.count("d")) == (4, 0)
    assert held.total() == 0  # every slot given back, also the refused one's
    with held.slot("d"):
        assert held.total() == 1


def test_the_per_service_bound_comes_first() -> None:
    held = HeldRequests(max_per_service=1, max_total=10)
    with held.slot("a"):
        with pytest.raises(QueueFullError, match=r"max_held_per_service"):
            with held.slot("a"):
                pass
        with held.slot("b"):
            assert held.total() == 2


def test_a_slot_is_given_back_when_its_block_fails() -> None:
    held = HeldRequests(max_per_service=2, max_total=2)
    with pytest.raises(RuntimeError):
        with held.slot("a"):
            raise RuntimeError("client gone")
    assert held.total() == 0 and held.count("a") == 0


@pytest.mark.parametrize(("per_service", "total"), [(0, 1), (1, 0)])
def test_bounds_below_one_are_refused(per_service: int, total: int) -> None:
    with pytest.raises(ValueError):
        HeldRequests(per_service, total)


def test_a_service_s_own_bound_replaces_the_activator_s() -> None:
    held = HeldRequests(max_per_service=3, max_total=10)
    with held.slot("small", limit=1):
        with pytest.raises(QueueFullError, match=r"services\[\]\.max_held"):
            with held.slot("small", limit=1):
                pass
    with contextlib.ExitStack() as slots:  # a larger own bound than the activator's
        for _ in range(5):
            slots.enter_context(held.slot("big", limit=5))
        with pytest.raises(QueueFullError):
            with held.slot("big", limit=5):
                pass
