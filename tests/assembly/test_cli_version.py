"""`torpor --version`: the installed version, one line, exit 0, no config needed."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import torpor


def test_version_prints_the_installed_version() -> None:
    done = subprocess.run([sys.executable, "-m", "assembly.cli", "--version"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"torpor {importlib.metadata.version('torpor')}\n"
    assert importlib.metadata.version("torpor") == torpor.__version__
