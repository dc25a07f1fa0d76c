"""Fixtures of the fleet tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fake_kube import FakeKube


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    """The fake Kubernetes API server (and its kubelet's pod processes), always stopped."""
    with FakeKube() as fake:
        yield fake
