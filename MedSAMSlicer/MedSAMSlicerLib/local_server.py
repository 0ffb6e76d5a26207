"""The local ``medsam serve``: a child process on 127.0.0.1 with a random token."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class LocalServer:
    """``medsam serve`` as a child process on 127.0.0.1 with a random token.

    ``python`` is the interpreter that has ``medsam_server`` (Slicer's ``PythonSlicer``); the token is
    written to a private file that the server reads, so it never shows in a process list.
    """

    def __init__(self, python: str | None = None, port: int = 0, extra_args: Sequence[str] = (),
                 log_path: str | None = None) -> None:
        self.python = python or sys.executable
        self.port = port
        self.extra_args = list(extra_args)
        self.log_path = log_path
        self.token = ""
        self.url = ""
        self.process: subprocess.Popen | None = None
        self._folder: tempfile.TemporaryDirectory | None = None
        self._log = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> tuple[str, str]:
        """Start the server unless it runs; returns (url, token). Does not wait for it to answer."""
        if self.running:
            return self.url, self.token
        self.stop()
        self._folder = tempfile.TemporaryDirectory(prefix="medsam-slicer-")
        self.token = secrets.token_urlsafe(32)
        token_file = os.path.join(self._folder.name, "token")
        descriptor = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(self.token)
        port = self.port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = self.log_path or os.path.join(self._folder.name, "server.log")
        self._log = open(self.log_path, "ab")
        command = [self.python, "-m", "medsam_server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--token-file", token_file, *self.extra_args]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self.url, self.token

    def log_tail(self, characters: int = 2000) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(self.log_path) - characters))
            return handle.read().decode("utf-8", "replace")

    def wait_ready(self, probe: Callable[[], Any], timeout: float = 120.0, cancel: Any = None) -> None:
        """Call ``probe`` (e.g. ``client.info``) until it succeeds; raise with the server's log if it died."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise RuntimeError(f"the local MedSAM server stopped during start-up:\n{self.log_tail()}")
            try:
                return probe()
            except Exception as error:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the local MedSAM server did not answer within {timeout:.0f} s: {error}\n"
                                       f"{self.log_tail()}") from error
            if cancel is not None and cancel.is_set():
                raise RuntimeError("cancelled while the local server was starting")
            time.sleep(0.25)

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None
