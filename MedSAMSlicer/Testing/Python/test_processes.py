"""Process groups end as a whole (``processes.end_tree``): members that ignore SIGTERM are killed, and a
member that is only a zombie is not waited for. Real processes; Linux (the states are checked in /proc)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import MODULE_DIR

if not sys.platform.startswith("linux"):
    pytest.skip("checks process states in /proc", allow_module_level=True)

from MedSAMSlicerLib import processes  # noqa: E402


def state(pid: int) -> str:
    """The process's state letter from /proc ("" once it is gone and reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


IGNORES_SIGTERM = textwrap.dedent("""\
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                              "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
                              "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    child.stdout.readline()
    print(child.pid, flush=True)
    time.sleep(120)
    """)


def test_a_group_that_ignores_sigterm_is_killed_after_the_grace():
    leader = processes.start_tree([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE, text=True)
    try:
        member = int(leader.stdout.readline())  # both ignore SIGTERM from here on
        assert os.getpgid(member) == leader.pid
        start = time.monotonic()
        processes.end_tree(leader, grace=1.0)
        seconds = time.monotonic() - start
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, signal.SIGKILL)
            leader.wait()
    assert leader.returncode == -signal.SIGKILL  # SIGTERM was ignored: the escalation ended it
    assert state(member) in ("", "Z")  # killed too (a zombie only where nothing reaps orphans)
    assert 1.0 <= seconds < 6.0, f"end_tree took {seconds:.1f} s with a 1 s grace"


ZOMBIE_ONLY_GROUP = textwrap.dedent(f"""\
    import ctypes, json, subprocess, sys, time
    sys.path.insert(0, {MODULE_DIR!r})
    from MedSAMSlicerLib import processes
    # PR_SET_CHILD_SUBREAPER: the group's orphans become this process's children, and it reaps none of them,
    # as a container's PID 1 that reaps nothing does
    if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:
        print(json.dumps({{"subreaper": False}}))
        sys.exit(0)
    leader = processes.start_tree([sys.executable, "-c", "import subprocess, sys; "
                                   "p = subprocess.Popen([sys.executable, '-c', 'pass']); print(p.pid, flush=True)"],
                                  stdout=subprocess.PIPE, text=True)
    member = int(leader.stdout.readline())
    leader.wait()  # the leader is gone and reaped; its child, orphaned, is ours now, in the leader's group

    def member_state():
        try:
            with open(f"/proc/{{member}}/stat") as handle:
                return handle.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return ""

    deadline = time.monotonic() + 30
    while member_state() != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    answer = {{"subreaper": True, "state": member_state(), "proc": processes._states_from_proc(leader.pid),
               "ps": processes._states_from_ps(leader.pid)}}
    start = time.monotonic()
    processes.end_tree(leader, grace=5.0)
    answer["seconds"] = time.monotonic() - start
    print(json.dumps(answer))
    """)


def test_a_group_left_with_only_a_zombie_is_not_waited_for():
    """Before the states were read, ``killpg(pgid, 0)`` answered for the zombie and end_tree waited 5 + 2 s."""
    answer = json.loads(subprocess.run([sys.executable, "-c", ZOMBIE_ONLY_GROUP], capture_output=True, text=True,
                                       timeout=60, check=True).stdout)
    if not answer["subreaper"]:
        pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) is refused here")
    assert answer["state"] == "Z"
    assert answer["proc"] == ["Z"] and answer["ps"] == ["Z"]  # /proc, and ps as on macOS, agree
    assert answer["seconds"] < 2.0, f"end_tree waited {answer['seconds']:.1f} s for a zombie"


def test_ps_and_proc_read_the_same_states_of_a_live_group():
    leader = processes.start_tree([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 10
        while not processes._states_from_proc(leader.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc = processes._states_from_proc(leader.pid)
        assert len(proc) == 1 and proc[0] in ("S", "R")
        assert processes._states_from_ps(leader.pid) == proc
    finally:
        processes.end_tree(leader, grace=5.0)
    assert leader.returncode == -signal.SIGTERM
    assert processes._states_from_proc(leader.pid) == []
