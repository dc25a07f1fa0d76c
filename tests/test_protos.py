"""The generated protobuf/gRPC modules are reproducible and match protos/*.proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protos import generate


def test_generated_protos_are_up_to_date() -> None:
    stale = generate.stale_files()
    assert stale == [], f"stale generated files {stale}: run `python -m protos.generate`"


def test_check_mode_exits_zero_when_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "protos.generate", "--check"],
        cwd=generate.REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_generated_modules_import_with_installed_runtime() -> None:
    from protos import admin_pb2, admin_pb2_grpc

    assert admin_pb2.DESCRIPTOR.package == "torpor.admin.v1"
    assert hasattr(admin_pb2_grpc, "AdminStub")
    assert admin_pb2.ServiceStatus().HasField("last_call") is False


def test_check_mode_names_stale_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "protos").mkdir()
    for name in ("protos/admin.proto", *generate.generated_names("protos/admin.proto")):
        shutil.copy(generate.REPO_ROOT / name, tmp_path / name)
    (tmp_path / "protos/admin_pb2.pyi").write_text("# edited by hand\n")
    monkeypatch.setattr(generate, "REPO_ROOT", tmp_path)

    assert generate.main(["--check"]) == 1
    assert "protos/admin_pb2.pyi" in capsys.readouterr().err
    assert generate.stale_files() == ["protos/admin_pb2.pyi"]
