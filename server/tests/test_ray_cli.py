"""``medsam serve --replicas 2`` as a user starts it: the CLI path (``ray_serve.run``) in a child process.

The child starts its own local Ray cluster under a temporary folder of its own (``RAY_TMPDIR``), so that
every Ray process of this run can be told apart from any other Ray on the machine: the test stops only
what it started. Starting Ray and two LiteMedSAM replicas costs about a minute on the shared 2-core machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

pytest.importorskip("ray.serve", reason="the Ray tests need the ray extra: pip install -e 'server[ray]'")

from server_harness import free_port  # noqa: E402

START_SECONDS = 240  # Ray, its Serve controller and proxy, the ingress and two replicas loading the model
STOP_SECONDS = 60


def _processes() -> dict[int, tuple[int, str]]:
    """Every process: pid -> (parent pid, command line)."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{name}/cmdline", "rb") as handle:
                    command = handle.read().replace(b"\0", b" ").decode("utf-8", "replace")
            except (OSError, IndexError, ValueError):
                continue  # ended meanwhile
            found[int(name)] = (parent, command)
    return found


def _ours(root: int, ray_dir: str) -> set[int]:
    """The processes of this run: the child's descendants, and whatever names its Ray folder."""
    processes = _processes()
    mine, grew = {root}, True
    while grew:
        more = {pid for pid, (parent, _) in processes.items() if parent in mine} - mine
        mine |= more
        grew = bool(more)
    return mine | {pid for pid, (_, command) in processes.items() if ray_dir in command}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _serve(port: int, log, *args: str, env: dict | None = None) -> subprocess.Popen:
    """``medsam serve`` on 127.0.0.1:port, its output (Ray's included, which can be long) to the file ``log``."""
    command = [sys.executable, "-m", "medsam_server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--log-level", "warning", *args]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def _wait_healthy(process: subprocess.Popen, url: str, log) -> None:
    deadline = time.monotonic() + START_SECONDS
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise AssertionError(f"medsam serve --replicas 2 exited: {log.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == httpx.codes.OK:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"no /health answer within {START_SECONDS} s"
        time.sleep(1.0)


@pytest.mark.parametrize("stop", ["sigterm", "watched process ends"])
def test_medsam_serve_replicas_2_serves_then_stops_every_ray_process_it_started(stop, tmp_path):
    ray_dir = tempfile.mkdtemp(prefix="msr", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    watched = subprocess.Popen(["sleep", "600"])
    port = free_port()
    log = open(tmp_path / "serve.log", "w+b")
    process = _serve(port, log, "--replicas", "2", "--backend", "torch", "--watch-pid", str(watched.pid),
                     env={"RAY_TMPDIR": ray_dir})
    ours: set[int] = set()
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(process, url, log)
        info = httpx.get(url + "/info", timeout=30).json()
        assert [(r["replica"], r["alive"]) for r in info["replicas"]] == [(0, True), (1, True)]
        assert [r["load"]["threads"] for r in info["replicas"]] == [1, 1]  # one core each, torch and ONNX
        assert info["backend"] == "torch"

        ours = _ours(process.pid, ray_dir)
        assert len(ours) > 3, f"expected Ray's processes under the child, found {sorted(ours)}"
        if stop == "sigterm":
            process.send_signal(signal.SIGTERM)
        else:
            watched.kill()
            watched.wait()
        assert process.wait(timeout=STOP_SECONDS) == 0
        deadline = time.monotonic() + STOP_SECONDS
        while (_port_open(port) or any(map(_alive, ours))) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _port_open(port), f"port {port} still accepts connections after medsam serve stopped"
        left = {pid: _processes().get(pid, (0, "?"))[1][:120] for pid in ours if _alive(pid)}
        assert left == {}, f"Ray processes of this run outlived medsam serve: {left}"
    finally:
        for pid in [process.pid, *ours, watched.pid]:  # only this run's processes, by pid
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=30)
        watched.wait(timeout=30)
        log.close()
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_replicas_with_a_watch_pid_that_has_ended_is_refused_before_ray_starts(tmp_path):
    ended = subprocess.Popen(["true"])
    ended.wait()
    with open(tmp_path / "serve.log", "w+b") as log:
        process = _serve(free_port(), log, "--replicas", "2", "--watch-pid", str(ended.pid))
        assert process.wait(timeout=60) == 2
        log.seek(0)
        assert f"--watch-pid {ended.pid}: no such process" in log.read().decode()
