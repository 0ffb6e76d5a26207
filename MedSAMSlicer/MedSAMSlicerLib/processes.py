"""Child process trees that end as a whole.

Slicer's ``PythonSlicer`` is a launcher: it sets up the environment, starts the real interpreter as
its own child and waits. Ending only the launcher leaves that child running (holding its port, its
memory, the GPU). So a tree is started in a process group of its own and ended as a group:
POSIX ``start_new_session`` + ``killpg`` (SIGTERM, then SIGKILL); Windows a new process group with no
console window, ended by ``taskkill /T``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

WINDOWS = sys.platform == "win32"


def start_tree(command: Sequence[str], **popen: Any) -> subprocess.Popen:
    """``subprocess.Popen(command)`` as the leader of a new process group (session on POSIX)."""
    if WINDOWS:
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        popen["creationflags"] = popen.get("creationflags", 0) | flags
    else:
        popen["start_new_session"] = True
    return subprocess.Popen(list(command), **popen)


def _states_from_proc(pgid: int) -> list[str]:
    """The state letters (R, S, Z, ...) of the processes in group ``pgid``, from /proc (Linux)."""
    states = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()  # after "(command name)": state, ppid, pgrp
        except (OSError, IndexError):
            continue  # ended meanwhile
        if len(fields) > 2 and fields[2] == str(pgid):
            states.append(fields[0])
    return states


def _states_from_ps(pgid: int) -> list[str] | None:
    """The same from ``ps`` (macOS and other systems without /proc); None where ps cannot tell."""
    try:
        listing = subprocess.run(["ps", "-A", "-o", "pgid=,stat="], capture_output=True, text=True, timeout=5.0,
                                 stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    if listing.returncode != 0:
        return None
    rows = (line.split() for line in listing.stdout.splitlines())
    return [row[1][:1] for row in rows if len(row) == 2 and row[0] == str(pgid)]


def _group_alive(pgid: int) -> bool:
    """Does group ``pgid`` have a member that is not a zombie? ``killpg(pgid, 0)`` alone also answers for
    zombies (not reaped by their parent: e.g. orphans under a container's PID 1 that reaps nothing), which
    hold no port or memory."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal: still there (its state is read below)
        pass
    states = _states_from_proc(pgid) if os.path.isdir("/proc/self") else _states_from_ps(pgid)
    return states is None or any(state not in ("Z", "X") for state in states)


def _wait_group(process: subprocess.Popen, seconds: float) -> bool:
    """Reap the leader and wait until no member of its group is left; True when the group is gone."""
    deadline = time.monotonic() + seconds
    while True:
        process.poll()  # reap the leader, or it stays a zombie member of its own group
        if not _group_alive(process.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def end_tree(process: subprocess.Popen, grace: float = 10.0) -> None:
    """End ``process`` and every process it started (see the module docstring); returns when they are gone.

    Members get ``grace`` seconds after the polite signal, then are killed. A member that is only a
    zombie (not yet reaped by its new parent) holds no port or memory and is not waited for: the leader
    is reaped here, and the others' states are read from /proc, or from ``ps`` where there is no /proc.
    """
    if WINDOWS:
        if process.poll() is None:
            subprocess.run(["taskkill", "/T", "/PID", str(process.pid)], capture_output=True,
                           creationflags=subprocess.CREATE_NO_WINDOW)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True,
                               creationflags=subprocess.CREATE_NO_WINDOW)
                process.wait(timeout=grace)
        return
    pgid = process.pid  # start_new_session made the leader's pid the group id
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        if _wait_group(process, wait):
            break
    try:
        process.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        pass  # a leader that survives SIGKILL is in the kernel's hands; nothing more to do from here
