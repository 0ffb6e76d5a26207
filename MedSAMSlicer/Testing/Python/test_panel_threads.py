"""What the panel relies on while a run goes: daemon workers that never hold Slicer at exit, and a Lib that
reloads in the order its modules import each other (the module's developer Reload)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import time

import pytest

import MedSAMSlicerLib  # noqa: E402
from conftest import MODULE_DIR
from MedSAMSlicerLib import run  # noqa: E402

LIB_DIR = os.path.join(MODULE_DIR, "MedSAMSlicerLib")


def test_a_blocked_background_call_does_not_keep_the_process_from_exiting():
    script = textwrap.dedent(f"""\
        import sys, threading
        sys.path.insert(0, {MODULE_DIR!r})
        from MedSAMSlicerLib.run import in_background
        in_background(threading.Event().wait)  # blocked for good, like a call waiting on a silent server
        print("main thread done", flush=True)
        """)
    start = time.monotonic()
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0 and "main thread done" in finished.stdout
    assert time.monotonic() - start < 30


def test_background_results_and_errors_reach_the_future():
    assert run.in_background(lambda: 41 + 1).result(timeout=10) == 42

    def fails():
        raise ValueError("bad input")

    error = run.in_background(fails).exception(timeout=10)
    assert isinstance(error, ValueError) and str(error) == "bad input"


def _lib_imports(name: str) -> set[str]:
    with open(os.path.join(LIB_DIR, f"{name}.py")) as handle:
        tree = ast.parse(handle.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
    return found


def test_the_reload_order_lists_every_lib_module_after_what_it_imports():
    files = sorted(name[:-3] for name in os.listdir(LIB_DIR) if name.endswith(".py") and name != "__init__.py")
    assert sorted(MedSAMSlicerLib.MODULES) == files
    for position, name in enumerate(MedSAMSlicerLib.MODULES):
        later = set(MedSAMSlicerLib.MODULES[position:])
        assert not _lib_imports(name) & later, f"{name} imports {_lib_imports(name) & later}, reloaded after it"


def test_reloading_in_that_order_gives_modules_that_agree():
    """In a process of its own: reloading replaces the Lib's classes, which other tests hold on to."""
    pytest.importorskip("slicer")
    script = textwrap.dedent(f"""\
        import importlib, sys
        sys.path.insert(0, {MODULE_DIR!r})
        import MedSAMSlicerLib
        for name in MedSAMSlicerLib.MODULES:
            importlib.import_module("MedSAMSlicerLib." + name)
        old = sys.modules["MedSAMSlicerLib.errors"].InputError
        for name in MedSAMSlicerLib.MODULES:
            importlib.reload(sys.modules["MedSAMSlicerLib." + name])
        from MedSAMSlicerLib import errors, keyframes, run
        assert keyframes.InputError is errors.InputError is run.InputError, "a module kept the old error class"
        assert errors.InputError is not old
        print("reloaded", len(MedSAMSlicerLib.MODULES))
        """)
    answer = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == f"reloaded {len(MedSAMSlicerLib.MODULES)}"
