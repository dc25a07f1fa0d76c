"""Local replicas' ports: outside the kernel's ephemeral range, so that no outgoing
connection or bind(0) of another process can take one between the pick and the replica's
bind; `workloads.ports` chooses the range."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.configs import write_config
from torpor.config import load_config
from torpor.errors import ConfigError, WorkloadError
from torpor.workloads.local_ports import ReplicaPorts, default_range, ephemeral_range


def test_ephemeral_range_is_read_from_the_kernel(tmp_path: Path) -> None:
    fake = tmp_path / "range"
    fake.write_text("40000\t50000\n")
    assert ephemeral_range(fake) == (40000, 50000)
    assert ephemeral_range(tmp_path / "missing") == (32768, 60999)


@pytest.mark.parametrize(("ephemeral", "expected"), [
    ((32768, 60999), (22768, 32767)),  # Linux's default: the 10,000 ports below
    ((5000, 60999), (1024, 4999)),  # less room below: what there is
    ((1500, 60000), (60001, 65535)),  # no room below: above
])
def test_default_range_avoids_the_ephemeral_range(ephemeral: tuple[int, int],
                                                  expected: tuple[int, int]) -> None:
    assert default_range(ephemeral) == expected


def test_no_room_anywhere_is_a_clear_error() -> None:
    with pytest.raises(WorkloadError, match=r"set workloads\.ports"):
        default_range((1500, 65000))


def test_picks_are_in_the_range_skip_ports_in_use_and_go_round() -> None:
    with socket.socket() as taken:  # a port some other program listens on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = int(taken.getsockname()[1])
        ports = ReplicaPorts((busy, busy + 3))
        picked = [ports.pick({busy + 1}) for _ in range(4)]
    assert set(picked) == {busy + 2, busy + 3}  # busy is bound, busy+1 is ours already
    assert all(busy <= p <= busy + 3 for p in picked)


def test_a_full_range_is_a_clear_error() -> None:
    ports = ReplicaPorts((40000, 40001))
    with pytest.raises(WorkloadError, match=r"no free port left .* 40000-40001"):
        ports.pick({40000, 40001})


def test_the_default_is_outside_this_machines_ephemeral_range() -> None:
    ephemeral = ephemeral_range()
    ports = ReplicaPorts()
    assert not ports.overlaps(ephemeral)
    assert not ephemeral[0] <= ports.pick(set()) <= ephemeral[1]


def test_workloads_ports_in_the_config(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "", workloads="{kind: local, ports: 21000-21999}"))
    assert config.workloads.ports == (21000, 21999)
    assert load_config(write_config(tmp_path, "")).workloads.ports is None


@pytest.mark.parametrize(("value", "problem"), [
    ("80-90", "1024 ≤ LOW < HIGH ≤ 65535"),
    ("30000-20000", "1024 ≤ LOW < HIGH ≤ 65535"),
    ("30000", "a port range like 20000-29999"),
    ("[1, 2]", "a port range like 20000-29999"),
])
def test_bad_workloads_ports(tmp_path: Path, value: str, problem: str) -> None:
    path = write_config(tmp_path, "", workloads=f"{{kind: local, ports: {value}}}")
    with pytest.raises(ConfigError, match=r"workloads\.ports") as error:
        load_config(path)
    assert problem in str(error.value)


def test_workloads_ports_is_for_local_only(tmp_path: Path) -> None:
    path = write_config(tmp_path, "", workloads="{kind: kubernetes, ports: 21000-21999}")
    with pytest.raises(ConfigError, match=r"workloads\.ports"):
        load_config(path)
