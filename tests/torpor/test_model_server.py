"""The example model server as a real process: slow to load, then classifies and echoes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.net import free_port
from torpor.examples.model_server import classify

DEADLINE = 20.0  # seconds for the process to start and load; generous for busy machines
NAME = "sentiment"


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def start(tmp_path: Path, load_seconds: float) -> Server:
    port = free_port()
    log = tmp_path / f"model-server-{port}.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torpor.examples.model_server",
                "--port",
                str(port),
                "--name",
                NAME,
                "--load-seconds",
                str(load_seconds),
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    return Server(process, port, log)


def stop(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def request(
    url: str, data: bytes | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return response.status, dict(response.headers.items()), response.read()


def healthz_ok(server: Server) -> bool:
    try:
        status, _, body = request(server.url + "/healthz", timeout=1.0)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
    return status == 200 and body == b"ok"


def wait_until(condition: Callable[[], bool], server: Server, what: str) -> None:
    """Poll `condition` until it holds; fail early if the server died, late at DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if condition():
            return
        assert server.process.poll() is None, f"server exited early:\n{server.log_text()}"
        time.sleep(0.02)
    pytest.fail(f"{what} not within {DEADLINE}s; log:\n{server.log_text()}")


def wait_ready(server: Server) -> None:
    wait_until(lambda: healthz_ok(server), server, "/healthz answering 200")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start(tmp_path_factory.mktemp("model-server"), load_seconds=0.0)
    try:
        wait_ready(running)
        yield running
    finally:
        stop(running)


def test_healthz_fails_until_the_model_is_loaded(tmp_path: Path) -> None:
    loading = start(tmp_path, load_seconds=0.5)
    try:
        # The process is up and loading (it said so) but not listening yet.
        wait_until(lambda: "loading model" in loading.log_text(), loading, "the loading line")
        assert not healthz_ok(loading)
        wait_ready(loading)
        assert "listening on http://127.0.0.1:" in loading.log_text()
    finally:
        stop(loading)


@pytest.mark.parametrize(
    ("text", "label"),
    [("great good excellent", "positive"), ("terrible awful", "negative")],
)
def test_predict_classifies(server: Server, text: str, label: str) -> None:
    status, headers, body = request(server.url + "/predict", data=text.encode())
    assert status == 200
    result = json.loads(body)
    assert result["label"] == label
    assert result["model"] == NAME
    assert result["pid"] == server.process.pid
    assert result["port"] == server.port
    assert result["tokens"] == len(text.split())
    assert result["echo_bytes"] == len(text.encode())
    assert (result["score"] > 0) == (label == "positive")
    assert headers["x-served-by"] == f"{NAME}:{server.port}"


def test_predict_get_and_json_body(server: Server) -> None:
    _, _, body = request(server.url + "/predict?text=awful")
    assert json.loads(body)["label"] == "negative"
    _, _, body = request(server.url + "/predict", data=json.dumps({"text": "love it"}).encode())
    assert json.loads(body)["label"] == "positive"


def test_echo_returns_the_body_intact(server: Server) -> None:
    payload = os.urandom(4096)
    status, headers, body = request(server.url + "/echo", data=payload)
    assert status == 200
    assert body == payload
    assert headers["x-model-server"] == NAME
    assert headers["x-served-by"] == f"{NAME}:{server.port}"


def test_unknown_path_is_404_and_still_tagged(server: Server) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        request(server.url + "/nope")
    assert info.value.code == 404
    assert info.value.headers["x-served-by"] == f"{NAME}:{server.port}"


def test_sigterm_stops_gracefully(tmp_path: Path) -> None:
    running = start(tmp_path, load_seconds=0.0)
    try:
        wait_ready(running)
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=10) == 0
        assert "stopping" in running.log_text()
    finally:
        stop(running)


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("not good", "negative"),
        ("this is not bad at all", "positive"),
        ("the cat sat on the mat", "neutral"),
        ("", "neutral"),
    ],
)
def test_classifier(text: str, label: str) -> None:
    assert classify(text).label == label
