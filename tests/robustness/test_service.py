"""``prerank serve`` as a process: readiness, the bearer token beyond loopback, worker processes, and a graceful
SIGTERM that finishes the request in flight."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from prerank.serve.app import create_app, serve_in_thread
from prerank.serve.scorer import Scorer

from .cases import AUTH, BODY

SERVER = "import prerank.cli.serve; from prerank.cli import app; app()"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_process(
    artifact: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen, str]]:
    """``prerank serve ARTIFACT --runtime torch ARGS`` on a free port; yields (process, URL) once /ready answers."""
    port = free_port()
    cmd = [sys.executable, "-c", SERVER, "serve", str(artifact), "--runtime", "torch", "--port", str(port), *args]
    environ = {k: v for k, v in os.environ.items() if k != "PRERANK_TOKEN"} | {"OMP_NUM_THREADS": "1"} | (env or {})
    proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def test_ready_reports_the_verified_artifact(base: Path) -> None:
    scorer = Scorer.load(base / "art", runtime="torch")
    with serve_in_thread(create_app(scorer, token="secret")) as url:
        r = httpx.get(f"{url}/ready")  # a probe: no token needed
        assert r.status_code == 200
        assert r.json() == {
            "status": "ready",
            "model": "lr",
            "runtime": "torch",
            "weights_sha256": scorer.manifest["weights_sha256"],
            "num_items": scorer.cache.num_items,
        }
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.post(f"{url}/score", json=BODY, headers=AUTH).status_code == 200
        r = httpx.post(f"{url}/score", json=BODY)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_an_empty_token_is_refused(base: Path) -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        create_app(Scorer.load(base / "art", runtime="torch"), token=" ")


def _slow_request(port: int, body: bytes) -> socket.socket:
    """Send the headers and the first half of a ``POST /score``; the request is in flight until the rest comes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /score HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer secret\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[: len(body) // 2])
    return sock


def test_public_bind_with_token_and_graceful_sigterm(base: Path) -> None:
    env = {"PRERANK_TOKEN": "secret"}
    with serve_process(base / "art", "--host", "0.0.0.0", "--log-level", "warning", env=env) as (proc, url):
        assert httpx.get(f"{url}/metadata").status_code == 401
        assert httpx.get(f"{url}/metadata", headers=AUTH).json()["auth"] == "bearer"
        body = json.dumps(BODY).encode()
        sock = _slow_request(int(url.rsplit(":", 1)[1]), body)
        time.sleep(0.5)  # the server has the headers: the request is in flight
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.poll() is None, "the server exited with a request in flight"
        sock.sendall(body[len(body) // 2 :])
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
        sock.close()
        status, _, rest = response.partition(b"\r\n")
        assert status.startswith(b"HTTP/1.1 200"), response
        assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["ids"] == BODY["candidates"]
        # uvicorn re-raises the SIGTERM it caught once the in-flight requests are done: exit status -15 (or 0)
        assert proc.wait(30) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)


def test_two_workers_serve_and_stop_on_sigterm(base: Path) -> None:
    with serve_process(base / "art", "--workers", "2", "--log-level", "warning") as (proc, url):
        with httpx.Client(base_url=url) as client:
            assert all(client.post("/score", json=BODY).status_code == 200 for _ in range(20))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM)
