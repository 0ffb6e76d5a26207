"""The local server ends as a whole process tree, and dies with Slicer.

The server is the real ``medsam serve`` (LiteMedSAM on the CPU) started through a launcher like Slicer's
``PythonSlicer``: a script that starts the real interpreter as its own child, waits, and forwards no
signal. Slicer itself is played by a plain Python process that runs ``LocalServer`` as the module does.
Linux only: the tree is read from ``/proc``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import MODULE_DIR, REPO_DIR

if not sys.platform.startswith("linux"):
    pytest.skip("reads the process tree from /proc", allow_module_level=True)
pytest.importorskip("medsam_server")

from MedSAMSlicerLib import client as medsam_client  # noqa: E402
from MedSAMSlicerLib import local_server  # noqa: E402

SERVER_ARGS = ["--model", "litemedsam", "--device", "cpu"]
PRE_WATCH_PID_COMMIT = "d9ef4bb"  # a server of before `medsam serve --watch-pid`


def make_launcher(folder, pythonpath: str = "") -> str:
    """An executable like ``PythonSlicer``: sets the environment, runs the real interpreter as a child, waits."""
    path = os.path.join(str(folder), "PythonLauncher")
    with open(path, "w") as handle:
        handle.write(textwrap.dedent(f"""\
            #!{sys.executable}
            import os, subprocess, sys
            env = dict(os.environ)
            if {pythonpath!r}:
                env["PYTHONPATH"] = {pythonpath!r}
            sys.exit(subprocess.call([{sys.executable!r}, *sys.argv[1:]], env=env))
            """))
    os.chmod(path, 0o755)
    return path


def tree(pid: int) -> set[int]:
    """``pid`` and all its descendants, from /proc."""
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        for task in _listdir(f"/proc/{current}/task"):
            try:
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo.extend(int(child) for child in handle.read().split())
            except OSError:
                pass
    return found


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, int(port))) == 0


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_stop_ends_launcher_and_interpreter_and_closes_the_port(tmp_path):
    server = local_server.LocalServer(python=make_launcher(tmp_path), extra_args=SERVER_ARGS)
    url, token = server.start()
    try:
        server.wait_ready(medsam_client.MedSAMClient(url, token=token).info, timeout=300)
        pids = tree(server.process.pid)
        assert len(pids) >= 2, "the launcher should have started the real interpreter as its child"
    finally:
        server.stop()
    assert [pid for pid in pids if alive(pid)] == []
    assert not port_open(url)
    assert not server.running


def test_the_server_exits_when_slicer_is_killed(tmp_path):
    launcher = make_launcher(tmp_path)
    assert local_server.WATCH_PID_OPTION in local_server.serve_help(launcher)  # this checkout's server has it
    slicer_stand_in = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""\
        import sys, time
        sys.path.insert(0, {MODULE_DIR!r})
        from MedSAMSlicerLib.local_server import LocalServer
        server = LocalServer(python={launcher!r}, extra_args={SERVER_ARGS!r})
        url, token = server.start()
        print(url, token, server.process.pid, flush=True)
        time.sleep(3600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        url, token, launcher_pid = slicer_stand_in.stdout.readline().split()
        client = medsam_client.MedSAMClient(url, token=token)
        assert wait_for(lambda: _answers(client), 300), "the server never answered"
        pids = tree(int(launcher_pid))
        os.kill(slicer_stand_in.pid, signal.SIGKILL)  # not reaped yet: a zombie, as a crashed Slicer can be
        assert wait_for(lambda: not any(alive(pid) for pid in pids) and not port_open(url), 30), \
            f"still running 30 s after Slicer died: {[pid for pid in pids if alive(pid)]}"
    finally:
        slicer_stand_in.kill()
        slicer_stand_in.wait()
        for pid in tree(int(launcher_pid)) if "launcher_pid" in locals() else ():
            os.kill(pid, signal.SIGKILL)


def _answers(client) -> bool:
    try:
        client.health()
        return True
    except medsam_client.MedSAMClientError:
        return False


def test_a_server_without_watch_pid_still_starts_and_says_so(tmp_path):
    """A server installed before ``--watch-pid`` existed: extracted from git history, run through the launcher."""
    old = tmp_path / "old-server"
    old.mkdir()
    archive = subprocess.run(["git", "-C", REPO_DIR, "archive", PRE_WATCH_PID_COMMIT, "server/medsam_server"],
                             capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"no git history here to take the old server from: {archive.stderr.decode()[:200]}")
    subprocess.run(["tar", "-x", "-C", str(old), "--strip-components=1"], input=archive.stdout, check=True)
    launcher = make_launcher(tmp_path, pythonpath=str(old))
    assert local_server.WATCH_PID_OPTION not in local_server.serve_help(launcher)
    server = local_server.LocalServer(python=launcher, extra_args=SERVER_ARGS)
    url, token = server.start()
    try:
        info = server.wait_ready(medsam_client.MedSAMClient(url, token=token).info, timeout=300)
        assert info["model"] == "litemedsam"
        assert local_server.WATCH_PID_OPTION not in server.process.args
        assert any(local_server.WATCH_PID_OPTION in note for note in server.notes)
    finally:
        server.stop()
    assert not port_open(url)
