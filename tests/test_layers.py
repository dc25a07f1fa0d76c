"""The layers read bottom-up, checked on the source: `torpor/` (the shared core) imports no
component; `xds_server/` and `activator/` are peers that never import each other;
`policies/` is pure and imports nothing of torpor but the statistics types; only
`assembly/` (processes and the command line) imports both components. Every import counts,
also one inside a function or under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("torpor", "xds_server", "activator", "policies", "protos", "assembly")

#: package → first-party packages it may import (itself always).
MAY_IMPORT: dict[str, set[str]] = {
    "torpor": {"protos"},  # the admin API client speaks the generated protos
    "policies": {"torpor"},  # torpor.call_stats only: checked below
    "xds_server": {"torpor", "policies", "protos"},
    "activator": {"torpor", "protos"},
    "assembly": {"torpor", "policies", "protos", "xds_server", "activator"},
}
#: What policies/ may take from torpor.
POLICY_INPUTS = {"torpor.call_stats"}


def imported_modules(path: Path) -> set[str]:
    """Absolute first-party modules `path` imports anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {m for m in found if m.split(".")[0] in FIRST_PARTY}


def sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "_pb2" not in p.name)


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_package_imports_only_the_layers_below(package: str) -> None:
    allowed = MAY_IMPORT[package] | {package}
    breaks = {f"{path.relative_to(ROOT)} imports {module}"
              for path in sources(package) for module in imported_modules(path)
              if module.split(".")[0] not in allowed}
    assert not breaks, sorted(breaks)


def test_policies_take_only_the_statistics_types_from_torpor() -> None:
    taken = {module for path in sources("policies") for module in imported_modules(path)
             if module.split(".")[0] == "torpor"}
    assert taken <= POLICY_INPUTS


def test_xds_server_and_activator_are_peers() -> None:
    """Spelled out, since it is the rule the lifecycle package was made for."""
    for package, peer in (("xds_server", "activator"), ("activator", "xds_server")):
        for path in sources(package):
            assert not any(m.split(".")[0] == peer for m in imported_modules(path)), path


def test_every_package_is_checked() -> None:
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages - {"tests", "bench"} <= set(MAY_IMPORT) | {"protos"}
