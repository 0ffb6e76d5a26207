"""A real uvicorn server on 127.0.0.1 for the tests, and the Slicer module's client.

The server runs in a background thread of the test process (``uvicorn.Server.run``
on a socket bound to port 0), so a test module loads LiteMedSAM once and may share
model and embedding cache with direct engine calls; ``serve_subprocess`` starts
``medsam serve`` as a child process for the tests that must kill it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Optional

import uvicorn

from medsam_server.app import Settings, build_app

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODULE_DIR = os.path.join(REPO, "MedSAMSlicer")


def load_client_module():
    """``MedSAMSlicerLib.client``, imported as Slicer imports it (``MedSAMSlicerLib`` needs no qt or torch)."""
    if MODULE_DIR not in sys.path:
        sys.path.insert(0, MODULE_DIR)
    from MedSAMSlicerLib import client

    return client


@contextlib.contextmanager
def running_server(settings: Settings, model=None, cache=None) -> Iterator[tuple[str, object]]:
    """Serve ``build_app(settings, model, cache)`` on 127.0.0.1:<free port>; yields (url, app)."""
    app = build_app(settings, model=model, cache=cache)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn-test")
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_subprocess(port: int, *args: str, env: Optional[dict] = None) -> subprocess.Popen:
    """``python -m medsam_server.cli serve`` on 127.0.0.1:port as a child process (output to a pipe)."""
    command = [sys.executable, "-m", "medsam_server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--log-level", "warning", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
