"""Trace readers of `torpor policy replay` (assembly/traces.py) on small generated files:
what they read, and one clear line naming the file (and line) for what they cannot."""

from __future__ import annotations

from pathlib import Path

import pytest

from assembly.traces import TraceError, read_azure_functions, read_servegen, read_trace


def servegen_file(path: Path, rates: list[float], window: float = 600, start: float = 0) -> Path:
    """A ServeGen chunk file: one row per window, as the published data writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(
        f"{start + i * window:g},{rate},{1.5 if rate else 0},{'Gamma' if rate else ''},1,2\n"
        for i, rate in enumerate(rates)))
    return path


def azure_file(path: Path, rows: dict[str, list[int]], minutes: int | None = None) -> Path:
    minutes = minutes if minutes is not None else len(next(iter(rows.values())))
    header = ",".join(["HashFunction", "HashOwner", "HashApp",
                       *(f"minute_{i}" for i in range(1, minutes + 1))])
    body = "".join(f"{name},{name},{name},{','.join(map(str, counts))}\n"
                   for name, counts in rows.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + body)
    return path


# ServeGen ------------------------------------------------------------------------------


def test_servegen_folder_one_service_per_file_window_from_the_column(tmp_path: Path) -> None:
    folder = tmp_path / "m-tiny"
    servegen_file(folder / "chunk-0-trace.csv", [0, 0.5, 0, 0.0017], window=300)
    servegen_file(folder / "chunk-10-trace.csv", [0, 0, 0, 0], window=300)
    servegen_file(folder / "chunk-2-trace.csv", [1, 0, 0, 0], window=300)
    (folder / "notes.txt").write_text("not a chunk\n")

    trace = read_servegen(folder)

    assert trace.name == "m-tiny"
    assert trace.window == 300
    assert list(trace.services) == ["chunk-0", "chunk-2", "chunk-10"]  # numeric order
    assert trace.services["chunk-0"] == [False, True, False, True]
    assert trace.services["chunk-2"] == [True, False, False, False]
    assert trace.services["chunk-10"] == [False] * 4
    assert trace.windows == 4


def test_servegen_files_are_aligned_on_window_start(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    servegen_file(folder / "chunk-0-trace.csv", [1, 1, 0], start=0)
    servegen_file(folder / "chunk-1-trace.csv", [1, 1], start=1200)

    trace = read_servegen(folder)

    assert trace.services["chunk-0"] == [True, True, False, False]
    assert trace.services["chunk-1"] == [False, False, True, True]


def test_servegen_one_file_is_a_trace_of_one_service(tmp_path: Path) -> None:
    file = servegen_file(tmp_path / "chunk-7-trace.csv", [0, 2, 0])
    loaded = read_trace(file, "servegen")
    assert loaded.trace.services == {"chunk-7": [False, True, False]}
    assert loaded.summary() == {"name": "chunk-7-trace", "path": str(file),
                                "format": "servegen", "services": 1, "windows": 3,
                                "window_seconds": 600.0, "windows_with_calls": 1}


def test_servegen_blank_lines_are_skipped(tmp_path: Path) -> None:
    file = tmp_path / "chunk-0-trace.csv"
    file.write_text("0,1,0,,0,0\n\n600,0,0,,0,0\n\n")
    assert read_servegen(file).services["chunk-0"] == [True, False]


@pytest.mark.parametrize(("content", "line", "says"), [
    ("0,0,0,,0,0\n600,abc,0,,0,0\n", 2, "rate_req_per_s 'abc' is not a number"),
    ("0,0,0,,0,0\nsix hundred\n", 2, "expected window_start_s,rate_req_per_s"),
    ("0,0,0,,0,0\n600,-1,0,,0,0\n", 2, "not a finite number ≥ 0"),
    ("0,0,0,,0,0\n600,nan,0,,0,0\n", 2, "not a finite number ≥ 0"),
    ("x,0,0,,0,0\n", 1, "window_start_s 'x' is not a number"),
    ("0,0,0,,0,0\n600,0,0,,0,0\n1500,0,0,,0,0\n", 3, "mixed window lengths"),
    ("600,0,0,,0,0\n0,0,0,,0,0\n", 2, "does not come after"),
])
def test_servegen_malformed_row_names_file_and_line(tmp_path: Path, content: str, line: int,
                                                     says: str) -> None:
    folder = tmp_path / "t"
    servegen_file(folder / "chunk-0-trace.csv", [0, 1, 0])
    bad = folder / "chunk-1-trace.csv"
    bad.write_text(content)
    with pytest.raises(TraceError) as caught:
        read_servegen(folder)
    message = str(caught.value)
    assert message.startswith(f"{bad}:{line}: ")
    assert says in message
    assert "\n" not in message


def test_servegen_mixed_window_lengths_across_files(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    servegen_file(folder / "chunk-0-trace.csv", [0, 1, 0], window=600)
    servegen_file(folder / "chunk-1-trace.csv", [0, 1, 0], window=60)
    with pytest.raises(TraceError, match=r"chunk-1-trace\.csv: windows of 60 s, but .*"
                                         r"chunk-0-trace\.csv has windows of 600 s: mixed"):
        read_servegen(folder)


def test_servegen_start_off_the_grid(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    servegen_file(folder / "chunk-0-trace.csv", [0, 1, 0])
    servegen_file(folder / "chunk-1-trace.csv", [0, 1, 0], start=300)
    with pytest.raises(TraceError, match="off the 600 s grid"):
        read_servegen(folder)


def test_servegen_missing_empty_and_nested_folders(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such file or folder"):
        read_servegen(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match=r"empty: no chunk-\*-trace\.csv files in this folder$"):
        read_servegen(tmp_path / "empty")
    servegen_file(tmp_path / "language" / "m-a" / "chunk-0-trace.csv", [1, 0])
    servegen_file(tmp_path / "language" / "m-b" / "chunk-0-trace.csv", [1, 0])
    with pytest.raises(TraceError, match="its subfolders m-a, m-b hold traces: pass each"):
        read_servegen(tmp_path / "language")
    (tmp_path / "e" / "chunk-0-trace.csv").parent.mkdir()
    (tmp_path / "e" / "chunk-0-trace.csv").write_text("")
    with pytest.raises(TraceError, match=r"chunk-0-trace\.csv: empty file"):
        read_servegen(tmp_path / "e")


def test_servegen_one_row_everywhere_has_no_window_length(tmp_path: Path) -> None:
    servegen_file(tmp_path / "t" / "chunk-0-trace.csv", [1])
    with pytest.raises(TraceError, match="cannot tell the window length"):
        read_servegen(tmp_path / "t")


def test_not_text(tmp_path: Path) -> None:
    file = tmp_path / "chunk-0-trace.csv"
    file.write_bytes(b"0,\xff\xfe\n")
    with pytest.raises(TraceError, match="not a text file"):
        read_servegen(file)


# Azure Functions -----------------------------------------------------------------------


def test_azure_functions_rows_are_services_in_minutes(tmp_path: Path) -> None:
    file = azure_file(tmp_path / "3_inv.csv", {"f1": [0, 3, 0, 1], "f2": [0, 0, 0, 0],
                                               "f3": [12, 0, 0, 0]})
    trace = read_azure_functions(file)
    assert trace.name == "3_inv"
    assert trace.window == 60
    assert trace.services == {"f1": [False, True, False, True], "f2": [False] * 4,
                              "f3": [True, False, False, False]}


def test_azure_functions_folder_with_one_inv_file_and_its_siblings(tmp_path: Path) -> None:
    azure_file(tmp_path / "day" / "3_inv.csv", {"f1": [0, 1]})
    (tmp_path / "day" / "3_run.csv").write_text("not,this\n")
    loaded = read_trace(tmp_path / "day", "azure-functions")
    assert loaded.trace.name == "day"
    assert loaded.trace.services == {"f1": [False, True]}


def test_azure_functions_same_function_twice_is_one_service(tmp_path: Path) -> None:
    file = tmp_path / "x_inv.csv"
    file.write_text("HashFunction,HashOwner,HashApp,minute_1,minute_2,minute_3\n"
                    "f,o,a,1,0,0\nf,o,a,0,0,2\n")
    assert read_azure_functions(file).services == {"f": [True, False, True]}


@pytest.mark.parametrize(("content", "where", "says"), [
    ("HashFunction,HashOwner,HashApp,minute_1,minute_2\nf,o,a,1\n", 2,
     "4 columns, the header has 5"),
    ("HashFunction,HashOwner,HashApp,minute_1,minute_2\nf,o,a,1,x\n", 2,
     "minute_2 'x' is not a count of calls"),
    ("HashFunction,HashOwner,HashApp,minute_1,minute_2\nf,o,a,1,2\ng,o,a,-1,2\n", 3,
     "minute_1 '-1' is not a count of calls"),
    ("HashFunction,HashOwner,HashApp,minute_1,minute_2\nf,o,a,1,2.5\n", 2,
     "minute_2 '2.5' is not a count of calls"),
    ("HashOwner,HashFunction,HashApp,minute_1\nf,o,a,1\n", 1,
     "column 1 is 'HashOwner', not HashFunction"),
    ("HashFunction,HashOwner,HashApp,minute_1,minute_3\n", 1,
     "column 5 is 'minute_3', not minute_2"),
    ("HashFunction,HashOwner,HashApp\n", 1, "column 4 is nothing, not minute_1"),
    ("", 1, "expected the header"),
])
def test_azure_functions_malformed_names_file_and_line(tmp_path: Path, content: str, where: int,
                                                        says: str) -> None:
    file = tmp_path / "x_inv.csv"
    file.write_text(content)
    with pytest.raises(TraceError) as caught:
        read_azure_functions(file)
    assert str(caught.value).startswith(f"{file}:{where}: ")
    assert says in str(caught.value)


def test_azure_functions_folders_and_header_only(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such file or folder"):
        read_azure_functions(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match=r"expected one \*_inv\.csv file in this folder, "
                                         "found none"):
        read_azure_functions(tmp_path / "empty")
    azure_file(tmp_path / "two" / "a_inv.csv", {"f": [1]})
    azure_file(tmp_path / "two" / "b_inv.csv", {"f": [1]})
    with pytest.raises(TraceError, match=r"found 2 \(a_inv.csv, b_inv.csv\): pass one"):
        read_azure_functions(tmp_path / "two")
    header_only = tmp_path / "h_inv.csv"
    header_only.write_text("HashFunction,HashOwner,HashApp,minute_1\n")
    with pytest.raises(TraceError, match="no functions"):
        read_azure_functions(header_only)


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="unknown trace format 'csv'"):
        read_trace(tmp_path, "csv")
