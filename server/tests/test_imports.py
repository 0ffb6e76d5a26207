"""What must not load torch: prompts, wire and io (the Slicer-side validation paths), and ``medsam --help``."""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_prompts_wire_and_io_import_no_torch():
    loaded = _modules_after("import medsam_server.prompts, medsam_server.wire, medsam_server.io, "
                            "medsam_server.requests, medsam_server.protocol")
    assert "medsam_server.prompts" in loaded and "medsam_server.io" in loaded
    assert "torch" not in loaded and "fastapi" not in loaded


def test_medsam_help_imports_neither_numpy_nor_any_command():
    loaded = _modules_after("from medsam_server import cli\ncli.build_parser()")
    assert "medsam_server.cli" in loaded
    assert not {"numpy", "torch", "fastapi"} & loaded
    assert not [m for m in loaded if m.startswith("medsam_server.commands.")]


def test_a_command_loads_only_its_own_module_and_no_torch_before_it_runs():
    loaded = _modules_after("from medsam_server import cli\ncli.build_parser('serve')")
    assert [m for m in loaded if m.startswith("medsam_server.commands.")] == ["medsam_server.commands.serve"]
    assert not {"torch", "fastapi", "SimpleITK", "scipy", "cv2"} & loaded


def test_every_command_prints_its_help(capsys):
    import pytest

    from medsam_server import cli

    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as done:
            cli.main([name, "--help"])
        assert done.value.code == 0 and f"usage: medsam {name}" in capsys.readouterr().out
