"""Regenerates the Python modules of protos/*.proto with grpcio-tools.

Owns: the one protoc command line of the project. Run from anywhere:

    python -m protos.generate          # rewrite protos/admin_pb2.py, .pyi, admin_pb2_grpc.py
    python -m protos.generate --check  # exit 1, naming the stale files, if they differ

protoc runs from the repository root with `-I .`, so the generated modules import each
other as `from protos import admin_pb2`. Must not be imported by runtime code.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The .proto files to compile, relative to the repository root.
PROTO_FILES: tuple[str, ...] = ("protos/admin.proto",)


def generated_names(proto: str) -> tuple[str, ...]:
    """The files protoc writes for `proto`, relative to the repository root."""
    stem = proto.removesuffix(".proto")
    return (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py")


def generate(out_dir: Path) -> list[str]:
    """Compile every proto into `out_dir` (mirroring the repo layout); returns the files."""
    # Only needed here, not by anything importing protos; grpc_tools ships no type hints.
    from grpc_tools import protoc  # type: ignore[import-untyped]

    well_known = str(resources.files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            "-I",
            str(REPO_ROOT),
            "-I",
            well_known,
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(REPO_ROOT / proto),
        ]
        code = protoc.main(args)
        if code != 0:
            raise SystemExit(f"protoc failed on {proto} (exit {code})")
    return [name for proto in PROTO_FILES for name in generated_names(proto)]


def stale_files() -> list[str]:
    """Generated files that are missing or differ from a fresh generation."""
    with tempfile.TemporaryDirectory(prefix="torpor-protos-") as tmp:
        fresh_root = Path(tmp)
        names = generate(fresh_root)
        stale = []
        for name in names:
            committed = REPO_ROOT / name
            fresh = (fresh_root / name).read_bytes()
            if not committed.is_file() or committed.read_bytes() != fresh:
                stale.append(name)
        return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__)
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the committed generated files are stale",
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(
                "stale generated files (run `python -m protos.generate`): " + ", ".join(stale),
                file=sys.stderr,
            )
            return 1
        print("generated protos are up to date")
        return 0
    for name in generate(REPO_ROOT):
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
