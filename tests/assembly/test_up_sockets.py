"""`torpor up` checks its socket files before it starts, as it checks its ports."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from assembly.up import check_ports_free
from torpor.config import load_config
from torpor.errors import TorporError


def test_a_socket_someone_answers_on_is_taken_and_a_dead_one_is_free(tmp_path: Path) -> None:
    path = tmp_path / "torpor.yaml"
    path.write_text("gateway: {listen: 127.0.0.1:0}\n"
                    "control_plane: {admin_api: 127.0.0.1:0, metrics: 127.0.0.1:0}\n"
                    "activator: {listen: 127.0.0.1:0, listen_h2: 127.0.0.1:0, "
                    "metrics: 127.0.0.1:0}\nservices: []\n")
    config = load_config(path)
    admin = config.gateway.admin.unix
    assert admin is not None
    check_ports_free(config)  # nothing there yet
    admin.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(admin))
        live.listen(1)
        with pytest.raises(TorporError, match=r"gateway\.admin: .* is in use"):
            check_ports_free(config)
    check_ports_free(config)  # a killed run's file: nobody answers, so it is free
