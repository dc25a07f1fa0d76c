"""`scripts/torpor` runs the command line from the project's environment, with relative
paths taken from the folder it is called from (not the repository root)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "torpor"


def test_config_is_found_relative_to_the_callers_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text(
        "gateway: {listen: 127.0.0.1:18999}\ncontrol_plane: {xds: 127.0.0.1:18998}\n")
    done = subprocess.run([str(SCRIPT), "envoy-bootstrap", "--config", "./mine.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    boot = json.loads(done.stdout)
    assert "18998" in json.dumps(boot["static_resources"])

    missing = subprocess.run([str(SCRIPT), "status", "--config", "./absent.yaml"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             check=False)
    assert missing.returncode == 2
    assert f"{tmp_path}/absent.yaml" in missing.stderr or "./absent.yaml" in missing.stderr
    assert "config file not found" in missing.stderr
