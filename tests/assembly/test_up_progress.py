"""What `torpor up` prints once its services are up: quarantined services by name, and
"not ready: <Envoy's error>" instead of "ready." while Envoy rejects the config (a
stand-in control plane; tests/integration/test_quarantine.py runs the real one)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from assembly.up import show_progress
from tests.support.configs import model_service, write_config
from torpor.config import load_config


class StandIn:
    """The three things show_progress asks of a ControlPlane."""

    def __init__(self, reasons: list[str], notes: list[str]) -> None:
        self.reasons = reasons
        self.notes = notes
        self.settled_with: float | None = None

    async def statuses(self) -> list[Any]:
        return []

    async def wait_settled(self, timeout: float) -> list[str]:
        self.settled_with = timeout
        return self.reasons

    def quarantine_notes(self) -> list[str]:
        return self.notes


async def progress(tmp_path: Path, stand_in: StandIn) -> str:
    config = load_config(write_config(tmp_path, model_service("echo", 1)))
    out = io.StringIO()
    await show_progress(stand_in, config, out)  # type: ignore[arg-type]
    assert stand_in.settled_with == config.control_plane.ack_timeout
    return out.getvalue()


async def test_ready_names_quarantined_services_first(tmp_path: Path) -> None:
    text = await progress(tmp_path, StandIn([], ["quarantined: b: domain 'a.test' is "
                                                 "already served by 'a'"]))
    assert text.index("torpor:   quarantined: b: domain 'a.test'") < text.index(
        "torpor: ready.")


async def test_a_rejected_config_is_not_ready(tmp_path: Path) -> None:
    text = await progress(tmp_path, StandIn(["Envoy e1 rejected lds v3: cannot bind"], []))
    assert "torpor: not ready: Envoy e1 rejected lds v3: cannot bind" in text
    assert "ready. Send requests" not in text
