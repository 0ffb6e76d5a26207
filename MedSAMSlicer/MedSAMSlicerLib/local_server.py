"""The local ``medsam serve``: a child process tree on 127.0.0.1 with a random token, that dies with Slicer.

Two ways it ends: ``LocalServer.stop()`` ends the whole tree (``processes.end_tree``: the launcher
``PythonSlicer`` *and* the interpreter it started); and when Slicer dies without calling ``stop()``
(a crash, a kill), the server notices by itself, because it is started with ``--watch-pid`` and
Slicer's own pid. A server installed before that option existed still starts, without it; ``notes``
then says that it may outlive a crash and how to update it.
"""

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

from . import processes

WATCH_PID_OPTION = "--watch-pid"
_options_cache: dict[str, str] = {}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def serve_help(python: str, timeout: float = 120.0) -> str:
    """``medsam serve --help`` of the server that ``python`` runs (cached per interpreter; empty if it fails).

    Asking the installed server which options it knows works for any version, whatever it reports as
    its own version, and runs in a child process (nothing of the server is imported into Slicer).
    """
    if python not in _options_cache:
        try:
            answer = subprocess.run([python, "-m", "medsam_server.cli", "serve", "--help"], capture_output=True,
                                    text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                                    creationflags=subprocess.CREATE_NO_WINDOW if processes.WINDOWS else 0)
            _options_cache[python] = answer.stdout if answer.returncode == 0 else ""
        except (OSError, subprocess.TimeoutExpired):
            _options_cache[python] = ""
    return _options_cache[python]


class LocalServer:
    """``medsam serve`` as a child process tree on 127.0.0.1 with a random token.

    ``python`` is the interpreter that has ``medsam_server`` (Slicer's ``PythonSlicer``); the token is
    written to a private file that the server reads, so it never shows in a process list. ``watch_pid``
    is the process whose death ends the server (default: this process, i.e. Slicer).
    """

    def __init__(self, python: str | None = None, port: int = 0, extra_args: Sequence[str] = (),
                 log_path: str | None = None, watch_pid: int | None = None) -> None:
        self.python = python or sys.executable
        self.port = port
        self.extra_args = list(extra_args)
        self.log_path = log_path
        self.watch_pid = os.getpid() if watch_pid is None else int(watch_pid)
        self.token = ""
        self.url = ""
        self.notes: list[str] = []
        self.process: subprocess.Popen | None = None
        self._folder: tempfile.TemporaryDirectory | None = None
        self._log = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self, port: int, token_file: str) -> list[str]:
        """The command line of ``medsam serve``; ``--watch-pid`` only where the installed server knows it."""
        command = [self.python, "-m", "medsam_server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--token-file", token_file]
        if WATCH_PID_OPTION in serve_help(self.python):
            command += [WATCH_PID_OPTION, str(self.watch_pid)]
        else:
            self.notes = ["The installed MedSAM server is older than this extension and does not know "
                          f"{WATCH_PID_OPTION}: if Slicer crashes, it keeps running until you end it. "
                          "The module reinstalls the server it carries when that one is newer."]
        return command + self.extra_args

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
        command = self.command(port, token_file)
        self._log = open(self.log_path, "ab")
        self.process = processes.start_tree(command, stdout=self._log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        return self.url, self.token

    def log_tail(self, characters: int = 2000) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(self.log_path) - characters))
            return handle.read().decode("utf-8", "replace")

    def wait_ready(self, probe: Callable[[], Any], timeout: float = 120.0, cancel: Any = None) -> Any:
        """Call ``probe`` (e.g. ``client.info``) until it succeeds; raise with the server's log if it died."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise RuntimeError(f"the local MedSAM server stopped during start-up:\n{self.log_tail()}")
            try:
                return probe()
            except Exception as error:  # noqa: BLE001 - whatever the probe raises while the server starts
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the local MedSAM server did not answer within {timeout:.0f} s: {error}\n"
                                       f"{self.log_tail()}") from error
            if cancel is not None and cancel.is_set():
                raise RuntimeError("cancelled while the local server was starting")
            time.sleep(0.25)

    def stop(self) -> None:
        """End the server's whole process tree (launcher and interpreter) and remove its token file."""
        if self.process is not None:
            processes.end_tree(self.process)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None
