"""Installing the local server: from the folder the extension carries (bundled by CMake), under tested pins,
cancellable, detected without importing torch or the server; and the Python versions that can run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import MODULE_DIR, REPO_DIR
from MedSAMSlicerLib import install

SERVER_DIR = os.path.join(REPO_DIR, "server")


def _server_dependencies() -> list[Requirement]:
    with open(os.path.join(SERVER_DIR, "pyproject.toml"), "rb") as handle:
        return [Requirement(text) for text in tomllib.load(handle)["project"]["dependencies"]]


def _pins() -> dict[str, Requirement]:
    pins = [Requirement(text) for text in install.PINS]
    return {pin.name.lower(): pin for pin in pins}


def test_every_server_dependency_is_pinned_and_the_tested_versions_satisfy_the_pins():
    pins = _pins()
    import importlib.metadata

    for dependency in _server_dependencies():
        pin = pins.get(dependency.name.lower())
        assert pin is not None, f"{dependency.name} (a server dependency) has no pin in install.PINS"
        tested = importlib.metadata.version(dependency.name)  # the version this suite runs with
        assert pin.specifier.contains(Version(tested), prereleases=True), f"{dependency.name} {tested} breaks {pin}"
        assert dependency.specifier.contains(Version(tested), prereleases=True)
    assert set(pins) <= {d.name.lower() for d in _server_dependencies()}, "pins for packages the server does not use"
    assert not {"numpy", "simpleitk"} & {name for name, pin in pins.items() if "<" in str(pin.specifier)}, \
        "Slicer ships numpy and SimpleITK: an upper bound would make pip replace Slicer's own copy"


def test_torch_requirement_matches_the_server():
    torch = next(d for d in _server_dependencies() if d.name == "torch")
    assert str(torch.specifier) == install.TORCH_REQUIREMENT


def test_local_mode_is_offered_from_python_3_10_and_slicer_5_8_is_told_what_to_do():
    assert install.local_mode_problem((3, 12, 4)) == "" and install.local_mode_problem((3, 10, 0)) == ""
    message = install.local_mode_problem((3, 9, 10))  # Slicer 5.8
    assert "3.9.10" in message and "3.10" in message and "Remote" in message and "5.10" in message
    with open(os.path.join(SERVER_DIR, "pyproject.toml"), "rb") as handle:
        requires = tomllib.load(handle)["project"]["requires-python"]
    assert requires == ">=" + ".".join(str(v) for v in install.MINIMUM_PYTHON)


def test_detection_imports_neither_torch_nor_the_server():
    script = textwrap.dedent(f"""\
        import json, sys
        sys.path.insert(0, {MODULE_DIR!r})
        from MedSAMSlicerLib import install
        answer = [install.torch_installed(), install.installed_version(), install.install_reason({SERVER_DIR!r})]
        print(json.dumps([answer, sorted(m for m in ("torch", "medsam_server", "numpy") if m in sys.modules)]))
        """)
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    (torch, version, reason), imported = json.loads(output)
    assert torch is True and version == install.source_version(SERVER_DIR) and reason == ""
    assert imported == []


def test_server_source_names_what_is_missing(tmp_path):
    with pytest.raises(install.InstallError, match="no MedSAM server package in .*reinstall the extension"):
        install.server_source(str(tmp_path))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "pyproject.toml").write_text('[project]\nname = "someone-else"\nversion = "9"\n')
    with pytest.raises(install.InstallError, match="names someone-else"):
        install.server_source(str(tmp_path), developer_folder=str(tmp_path / "elsewhere"))
    assert install.server_source(str(tmp_path), developer_folder=SERVER_DIR) == SERVER_DIR


def test_plan_uses_an_installed_server_when_there_is_nothing_to_install_from(tmp_path):
    assert install.plan(str(tmp_path)) == (None, "")  # this venv has the server; no MedSAMServer/ folder here
    assert install.plan(str(tmp_path), developer_folder=SERVER_DIR) == (SERVER_DIR, "")


def test_a_newer_bundled_server_is_installed_over_an_older_one(tmp_path):
    newer = tmp_path / "newer"
    newer.mkdir()
    text = open(os.path.join(SERVER_DIR, "pyproject.toml")).read()
    version = install.source_version(SERVER_DIR)
    (newer / "pyproject.toml").write_text(text.replace(f'version = "{version}"', 'version = "99.0.0"'))
    assert "older than the 99.0.0 this extension carries" in install.install_reason(str(newer))


def test_pip_command_is_a_list_with_the_paths_whole():
    command = install.pip_command("/Slicer 5.10/bin/PythonSlicer", "C:\\Program Files\\Slicer\\MedSAMServer",
                                  "/tmp/a b/constraints.txt")
    assert command[:4] == ["/Slicer 5.10/bin/PythonSlicer", "-m", "pip", "install"]
    assert command[-1] == "C:\\Program Files\\Slicer\\MedSAMServer"
    assert command[command.index("--constraint") + 1] == "/tmp/a b/constraints.txt"


def test_the_steps_install_pytorch_first_only_where_it_is_missing():
    assert [step.kind for step in install.steps(SERVER_DIR, torch_present=False)] == ["torch", "server"]
    only = install.steps(SERVER_DIR, torch_present=True)
    assert [step.kind for step in only] == ["server"] and SERVER_DIR in only[0].status
    torch_step = install.steps(SERVER_DIR, torch_present=False)[0]
    assert torch_step.cancellable is False and "Cancel takes effect when it ends" in torch_step.status


class _Panel:
    """Stands in for the Slicer panel (no Slicer GUI here): its busy flag and what it saw at each step.
    The PyTorch step stands in for PyTorchUtils (a module of Slicer's PyTorch extension, absent here)."""

    def __init__(self):
        self.busy = False
        self.history = []
        self.busy_during = {}

    def set_busy(self, busy):
        self.busy = busy
        self.history.append(busy)

    def run_torch(self, step):
        self.busy_during[step.kind] = self.busy

    def start_server(self, step):
        self.busy_during[step.kind] = self.busy


def test_the_panel_is_busy_before_pytorch_installs_and_stays_busy_for_the_server_step():
    panel = _Panel()
    runs_on = install.walk(install.steps(SERVER_DIR, False), threading.Event(), panel.set_busy, panel.run_torch,
                           panel.start_server)
    assert runs_on is True
    assert panel.busy_during == {"torch": True, "server": True}
    assert panel.history == [True]  # cleared by the server step's end, not before


def test_a_failed_pytorch_step_clears_the_busy_state_and_starts_no_server_install():
    panel = _Panel()

    def fail(step):
        panel.run_torch(step)
        raise install.InstallError("PyTorch could not be installed; install it in the PyTorch Utils module.")

    with pytest.raises(install.InstallError, match="PyTorch could not be installed"):
        install.walk(install.steps(SERVER_DIR, False), threading.Event(), panel.set_busy, fail, panel.start_server)
    assert panel.busy_during == {"torch": True}
    assert panel.history == [True, False] and panel.busy is False


def test_cancel_during_the_pytorch_step_takes_effect_when_it_ends():
    panel = _Panel()
    cancel = threading.Event()

    def press_cancel_meanwhile(step):
        panel.run_torch(step)
        cancel.set()

    with pytest.raises(install.InstallCancelled, match="PyTorch is installed, the MedSAM server is not"):
        install.walk(install.steps(SERVER_DIR, False), cancel, panel.set_busy, press_cancel_meanwhile,
                     panel.start_server)
    assert "server" not in panel.busy_during
    assert panel.history == [True, False]


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """The server folder as the extension package holds it: BundleServer.cmake run by a real CMake."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("no cmake here")
    root = tmp_path_factory.mktemp("bundle")
    project = root / "project"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(textwrap.dedent(f"""\
        cmake_minimum_required(VERSION 3.16)
        project(BundleServerCheck NONE)
        set(MEDSAM_SERVER_SOURCE_DIR "{SERVER_DIR}")
        set(MEDSAM_SERVER_DESTINATION "lib/Slicer-5.10/qt-scripted-modules/MedSAMServer")
        set(MEDSAM_SERVER_BUILD_DIR "${{CMAKE_BINARY_DIR}}/qt-scripted-modules/MedSAMServer")
        include("{os.path.join(MODULE_DIR, 'BundleServer.cmake')}")
        """))
    build, prefix = root / "build", root / "Slicer extension"  # a space, as in "Program Files"
    subprocess.run([cmake, "-S", str(project), "-B", str(build)], check=True, capture_output=True)
    subprocess.run([cmake, "--install", str(build), "--prefix", str(prefix)], check=True, capture_output=True)
    folder = prefix / "lib" / "Slicer-5.10" / "qt-scripted-modules" / "MedSAMServer"
    assert (build / "qt-scripted-modules" / "MedSAMServer" / "pyproject.toml").is_file()
    return folder


def test_cmake_bundles_the_server_package_without_tests_or_build_leftovers(bundled):
    assert (bundled / "pyproject.toml").is_file() and (bundled / "medsam_server" / "cli.py").is_file()
    names = {p.name for p in bundled.rglob("*")}
    assert "tests" not in names and "__pycache__" not in names
    assert not any(name.endswith((".egg-info", ".pyc")) for name in names)
    assert install.server_source(str(bundled.parent)) == str(bundled)


def test_pip_installs_the_bundled_folder(bundled, tmp_path):
    """A real pip run from the bundled folder (no dependencies, into a target folder: nothing else changes)."""
    target = tmp_path / "site packages"
    lines = []
    runner = install.PipInstall(sys.executable, str(bundled), str(tmp_path / "install.log"),
                                options=["--no-deps", "--no-build-isolation", "--target", str(target)])
    runner.run(threading.Event(), lines.append)
    assert (target / "medsam_server" / "cli.py").is_file()
    version = install.source_version(str(bundled))
    assert (target / f"medsam_slicer_server-{version}.dist-info").is_dir()
    assert any("Successfully installed" in line for line in lines)
    log = (tmp_path / "install.log").read_text()
    assert "--constraint" in log and "Successfully installed" in log  # the log is kept for the user
    assert not list(bundled.glob("*.egg-info")) and not (bundled / "build").exists(), "pip wrote into the extension"


def test_cancel_ends_pip_and_installs_nothing(bundled, tmp_path):
    target = tmp_path / "site-packages"
    cancel = threading.Event()
    runner = install.PipInstall(sys.executable, str(bundled), str(tmp_path / "install.log"),
                                options=["--no-deps", "--no-build-isolation", "--target", str(target)])
    with pytest.raises(install.InstallCancelled, match="cancelled"):
        runner.run(cancel, lambda line: cancel.set())  # cancel at pip's first line of output
    assert runner.process.poll() is not None
    assert not (target / "medsam_server").exists()
