"""`torpor policy replay` end to end: a synthetic trace whose fixed-timer figures are worked
out by hand below, the JSON shape, the table, --plot, the errors, the learned-vs-fixed
comparison, and a real ServeGen excerpt (tests/data/README.md) against a window-by-window
replay written here from the semantics of DESIGN.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from assembly import cli
from assembly.replay_report import compare
from policies.replay import FIXED_TIMERS, Row
from tests.assembly.test_traces import servegen_file
from torpor.config import parse_duration

ROOT = Path(__file__).resolve().parents[2]
EXCERPT = ROOT / "tests" / "data" / "servegen-m-mid-excerpt"

#: 12 windows of 10 minutes. A has calls in windows 0, 2 and 10, B in window 5, C never.
SERVICES = {"chunk-0": {0, 2, 10}, "chunk-1": {5}, "chunk-2": set()}
WINDOWS = 12

# By hand. At the start of window t a service last called in window c has been idle
# (t-c-1)·10m; a timer T has it loaded while that idle time is < T; every service starts
# unloaded.
#  10m: loaded only in the window after a call. A: cold at 0, idle 1, cold at 2 (idle 10m),
#       idle 3, cold at 10, idle 11 → 3 cold, 3 idle. B: cold at 5, idle 6. → 4 cold of 4
#       windows with calls, 4 idle windows = 0.667 h.
#  30m: loaded 3 windows after a call. A: cold 0, idle 1, warm at 2, idle 3-5, cold at 10
#       (idle 70m), idle 11 → 2 cold, 5 idle. B: cold, idle 6-8. → 3 cold, 8 idle = 1.333 h.
#   1h: 6 windows. A: cold 0, idle 1, warm 2, idle 3-8, cold 10, idle 11 → 2 cold, 8 idle.
#       B: cold, idle 6-11. → 3 cold, 14 idle = 2.333 h.
#  ≥2h: A: cold 0, idle 1, warm 2, idle 3-9, warm 10, idle 11 → 1 cold, 9 idle. B: cold,
#       idle 6-11. → 2 cold, 15 idle = 2.5 h.
EXPECTED_FIXED = {  # timer (s) → (cold starts, loaded-idle windows)
    600: (4, 4), 1800: (3, 8), 3600: (3, 14), 7200: (2, 15), 6 * 3600: (2, 15),
    12 * 3600: (2, 15), 24 * 3600: (2, 15),
}


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    for name, calls in SERVICES.items():
        servegen_file(folder / f"{name}-trace.csv",
                      [0.02 if t in calls else 0.0 for t in range(WINDOWS)])
    return folder


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real command line, in a folder without any torpor.yaml."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "assembly.cli", "policy", "replay",
                           *map(str, args)], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=env)


def test_json_fixed_timers_match_the_hand_count(synthetic: Path, tmp_path: Path) -> None:
    result = run(synthetic, "--format", "servegen", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)

    assert set(document) == {"trace", "rows"}
    assert document["trace"] == {"name": "tiny", "path": str(synthetic), "format": "servegen",
                                 "services": 3, "windows": 12, "window_seconds": 600.0,
                                 "windows_with_calls": 4}
    keys = {"policy", "setting", "cold_start_share", "loaded_idle_hours", "windows_with_calls"}
    assert all(set(row) == keys for row in document["rows"])
    fixed = [row for row in document["rows"] if row["policy"] == "fixed"]
    assert [parse_duration(row["setting"]) for row in fixed] == list(FIXED_TIMERS)
    assert set(EXPECTED_FIXED) == set(FIXED_TIMERS)
    for row, timer in zip(fixed, FIXED_TIMERS, strict=True):
        cold, idle = EXPECTED_FIXED[int(timer)]
        assert row["windows_with_calls"] == 4
        assert row["cold_start_share"] == cold / 4, row
        assert row["loaded_idle_hours"] == pytest.approx(idle * 600 / 3600, rel=1e-12), row
    learned = [row for row in document["rows"] if row["policy"] == "learned"]
    assert learned, "the learning policy's sweep is missing"
    assert all(0 <= row["cold_start_share"] <= 1 and row["loaded_idle_hours"] >= 0
               for row in learned)


def test_table_header_rows_and_comparison(synthetic: Path, tmp_path: Path) -> None:
    result = run(synthetic, "--format", "servegen", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"tiny (servegen, {synthetic})"
    assert lines[1] == "  3 services, 12 windows of 10m (2h), 4 windows with calls"
    assert lines[3].split() == ["policy", "setting", "cold", "starts", "%", "loaded-idle", "h"]
    fixed = [line.split() for line in lines if line.startswith("fixed ")]
    assert fixed[:4] == [["fixed", "10m", "100.000", "0.7"], ["fixed", "30m", "75.000", "1.3"],
                         ["fixed", "1h", "75.000", "2.3"], ["fixed", "2h", "50.000", "2.5"]]
    comparisons = [line for line in lines if line.startswith("  fixed ")]
    assert len(comparisons) == len(FIXED_TIMERS)
    assert comparisons[0].startswith("  fixed 10m (100.000%, 0.7 h): ")
    assert result.stderr == ""  # no progress line for a replay this short


def test_several_paths_print_a_json_list(synthetic: Path, tmp_path: Path) -> None:
    other = tmp_path / "azure" / "2_inv.csv"
    other.parent.mkdir()
    other.write_text("HashFunction,HashOwner,HashApp,minute_1,minute_2,minute_3\n"
                     "f,f,f,1,0,4\ng,g,g,0,0,0\n")
    single = synthetic / "chunk-0-trace.csv"
    result = run(synthetic, single, "--format", "servegen", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    documents = json.loads(result.stdout)
    assert [d["trace"]["name"] for d in documents] == ["tiny", "chunk-0-trace"]
    assert [d["trace"]["services"] for d in documents] == [3, 1]

    azure = json.loads(run(other, "--format", "azure-functions", "--json",
                           cwd=tmp_path).stdout)
    assert azure["trace"]["window_seconds"] == 60.0
    assert azure["trace"]["windows_with_calls"] == 2
    ten_minutes = azure["rows"][0]
    # f: cold at minute 1, loaded-idle at minute 2 (idle 0 < 10m), warm at minute 3.
    assert (ten_minutes["setting"], ten_minutes["cold_start_share"]) == ("10m", 0.5)
    assert ten_minutes["loaded_idle_hours"] == pytest.approx(1 / 60)


def test_plot_writes_a_png(synthetic: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "out" / "replay.png"
    png.parent.mkdir()
    code = cli.main(["policy", "replay", str(synthetic), str(synthetic / "chunk-0-trace.csv"),
                     "--format", "servegen", "--plot", str(png)])
    assert code == 0
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 1000


def test_plot_without_matplotlib_says_what_to_install(
        synthetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    code = cli.main(["policy", "replay", str(synthetic), "--format", "servegen",
                     "--plot", str(tmp_path / "x.png")])
    assert code == 2
    err = capsys.readouterr().err
    assert err == "torpor: --plot needs matplotlib: pip install 'torpor[plot]'\n"
    assert not (tmp_path / "x.png").exists()


def bad_input(tmp_path: Path, case: str) -> Path:
    if case == "empty":
        (tmp_path / "empty").mkdir()
    elif case == "bad":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "chunk-0-trace.csv").write_text("0,0,0,,0,0\n600,x,0,,0,0\n")
    return tmp_path / case


def test_plot_into_a_missing_folder_fails_before_the_replay(
        synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "nowhere" / "x.png"
    code = cli.main(["policy", "replay", str(synthetic), "--format", "servegen",
                     "--plot", str(target)])
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"torpor: {target}: no folder {target.parent} to write the plot in\n"


@pytest.mark.parametrize(("case", "says"), [
    ("nowhere", "nowhere: no such file or folder"),
    ("empty", "no chunk-*-trace.csv files"),
    ("bad", "chunk-0-trace.csv:2: rate_req_per_s 'x' is not a number"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, case: str, says: str) -> None:
    path = bad_input(tmp_path, case)
    result = run(path, "--format", "servegen", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("torpor: "), result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr


def test_format_is_required_and_checked(synthetic: Path, tmp_path: Path) -> None:
    result = run(synthetic, "--format", "csv", cwd=tmp_path)
    assert result.returncode == 2 and "invalid choice: 'csv'" in result.stderr


# The comparison ------------------------------------------------------------------------


def row(policy: str, setting: str, cold: int, idle: float) -> Row:
    return Row(policy, setting, cold / 100, idle, 100, cold)


def test_compare_picks_the_least_idle_learned_row_with_no_more_cold_starts() -> None:
    rows = [row("fixed", "10m", 10, 50.0), row("fixed", "1h", 5, 80.0),
            row("fixed", "1d", 1, 200.0),
            row("learned", "a", 12, 10.0),  # fewer idle hours, but more cold starts
            row("learned", "b", 10, 40.0), row("learned", "c", 9, 45.0),
            row("learned", "d", 5, 90.0), row("learned", "e", 4, 90.0)]
    ten, hour, day = compare(rows)

    assert ten.learned is not None and ten.learned.setting == "b"
    assert ten.saving_hours == 10.0 and ten.saving_share == 0.2 and ten.dominates
    # Same idle time at 5 and 4 cold starts: the fewer cold starts win the tie.
    assert hour.learned is not None and hour.learned.setting == "e"
    assert hour.saving_hours == -10.0 and not hour.dominates
    assert day.learned is None and day.saving_hours is None and not day.dominates


# Real data -----------------------------------------------------------------------------


def brute_force_fixed(services: dict[str, list[bool]], window: float,
                      timer: float) -> tuple[int, int]:
    """(cold starts, loaded-idle windows), deciding window by window."""
    cold = idle = 0
    for series in services.values():
        last: int | None = None
        for t, busy in enumerate(series):
            loaded = last is not None and (t - last - 1) * window < timer
            if busy:
                cold += not loaded
                last = t
            elif loaded:
                idle += 1
    return cold, idle


def test_real_servegen_excerpt(tmp_path: Path) -> None:
    from assembly.traces import read_servegen

    result = run(EXCERPT, "--format", "servegen", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["trace"] | {"path": None} == {
        "name": "servegen-m-mid-excerpt", "path": None, "format": "servegen", "services": 4,
        "windows": 2016, "window_seconds": 600.0, "windows_with_calls": 198 + 14 + 28 + 65}

    services = {k: list(v) for k, v in read_servegen(EXCERPT).services.items()}
    fixed = [r for r in document["rows"] if r["policy"] == "fixed"]
    for r, timer in zip(fixed, FIXED_TIMERS, strict=True):
        cold, idle = brute_force_fixed(services, 600.0, timer)
        assert r["cold_start_share"] == pytest.approx(cold / 305, rel=1e-12), r
        assert r["loaded_idle_hours"] == pytest.approx(idle / 6, rel=1e-12), r
