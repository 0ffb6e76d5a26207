"""The timing-study recorder, headless: phases, pauses, files on disk, order errors, and a kill mid-case."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2]  # MedSAMSlicer/, which holds MedSAMSlicerLib
sys.path.insert(0, str(MODULE_DIR))
from MedSAMSlicerLib.timing import CaseRecorder, TimingError  # noqa: E402


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def read_lines(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream]


def phases(path: str) -> list[tuple[str, float]]:
    return [(r["phase"], r["seconds"]) for r in read_lines(path) if r["event"] == "phase"]


def test_assisted_case_records_each_phase_without_paused_time(tmp_path):
    clock = FakeClock()
    rec = CaseRecorder(str(tmp_path), "Dr. A/B", "case 7", "assisted", target="left lung", clock=clock)
    path = rec.start()
    assert Path(path).parent == tmp_path / "Dr._A_B" and Path(path).name.startswith("case_7-assisted-")
    assert rec.phase == "initial_marker"
    clock.advance(40.0)
    rec.pause()
    clock.advance(500.0)
    assert rec.elapsed() == 40.0  # the clock a UI shows stands still while paused
    rec.resume()
    clock.advance(20.0)
    rec.begin_inference(keyframe_count=7, keyframe_spacing=5)
    clock.advance(3.5)
    rec.end_inference(server_seconds=2.25)
    assert rec.phase == "refinement"
    clock.advance(120.0)
    end = rec.finish(slices_segmented=31)

    assert phases(path) == [("initial_marker", 60.0), ("inference", 3.5), ("refinement", 120.0)]
    records = read_lines(path)
    assert [r["event"] for r in records] == ["case_start", "pause", "resume", "phase", "phase", "phase", "case_end"]
    assert all((r["annotator"], r["case"], r["mode"], r["session"]) == ("Dr. A/B", "case 7", "assisted", rec.session)
               for r in records)  # every line carries its identity
    assert records[0]["target"] == "left lung"
    marker, inference = records[3], records[4]
    assert marker["paused_seconds"] == 500.0 and (marker["start"], marker["end"]) == (50.0, 610.0)
    assert inference["server_seconds"] == 2.25 and inference["ok"] is True
    assert (end["slices_segmented"], end["keyframe_count"], end["keyframe_spacing"]) == (31, 7, 5.0)
    assert end["active_seconds"] == 183.5 and rec.finished and rec.phase is None


def test_each_event_is_on_disk_before_the_next_call(tmp_path):
    clock = FakeClock()
    rec = CaseRecorder(str(tmp_path), "a", "c", "assisted", clock=clock)
    path = rec.start()
    assert [r["event"] for r in read_lines(path)] == ["case_start"]
    clock.advance(10.0)
    rec.begin_inference()
    assert phases(path) == [("initial_marker", 10.0)]  # readable by another process while the case runs
    rec.close()  # e.g. Slicer closed without Finish: the running phase is not recorded, the rest stays
    assert [r["event"] for r in read_lines(path)] == ["case_start", "phase"]


def test_manual_case_and_repeated_runs(tmp_path):
    clock = FakeClock()
    manual = CaseRecorder(str(tmp_path), "a", "c", "manual", clock=clock)
    path = manual.start()
    with pytest.raises(TimingError, match="belongs to assisted mode"):
        manual.begin_inference()
    clock.advance(900.0)
    manual.finish()
    assert phases(path) == [("manual", 900.0)]

    assisted = CaseRecorder(str(tmp_path), "a", "c", "assisted", clock=clock)
    path = assisted.start()
    assert path != manual.path
    for marker_s, run_s, ok, after_s in ((30.0, 2.0, False, 15.0), (0.0, 3.0, True, 60.0), (0.0, 1.0, True, 40.0)):
        clock.advance(marker_s)
        assisted.begin_inference()
        clock.advance(run_s)
        assisted.end_inference(ok=ok)
        assert assisted.phase == ("refinement" if ok else "initial_marker")  # a failed run sends you back to markers
        clock.advance(after_s)
    assisted.finish()
    assert phases(path) == [("initial_marker", 30.0), ("inference", 2.0), ("initial_marker", 15.0),
                            ("inference", 3.0), ("refinement", 60.0), ("inference", 1.0), ("refinement", 40.0)]


def test_calls_out_of_order_are_refused(tmp_path):
    rec = CaseRecorder(str(tmp_path), "a", "c", "assisted", clock=FakeClock())
    with pytest.raises(TimingError, match="not running"):
        rec.finish()
    with pytest.raises(TimingError, match="press Segment first"):
        rec.end_inference()
    rec.start()
    with pytest.raises(TimingError, match="already been started"):
        rec.start()
    with pytest.raises(TimingError, match="press Segment first"):
        rec.end_inference()
    rec.finish()
    with pytest.raises(TimingError, match="already finished"):
        rec.finish()
    with pytest.raises(TimingError, match="mode must be one of manual, assisted"):
        CaseRecorder(str(tmp_path), "a", "c", "automatic")


def test_sessions_started_in_the_same_second_get_their_own_files(tmp_path):
    paths = {CaseRecorder(str(tmp_path), "a", "c", "manual", clock=FakeClock()).start() for _ in range(3)}
    assert len(paths) == 3 and all(os.path.dirname(p) == str(tmp_path / "a") for p in paths)


WRITER = textwrap.dedent("""
    import itertools, sys
    sys.path.insert(0, sys.argv[1])
    from MedSAMSlicerLib.timing import CaseRecorder
    ticks = itertools.count(0.0, 1.0)  # every clock reading is one second later
    rec = CaseRecorder(sys.argv[2], "expert 1", "042", "assisted", clock=lambda: next(ticks))
    rec.start()                      # t = 0
    rec.begin_inference()            # t = 1: initial_marker 1 s
    rec.end_inference(server_seconds=0.5)  # t = 2: inference 1 s
    while True:                      # refinement: write events as fast as the disk allows until killed
        rec.pause()
        rec.resume()
""")


def test_recorder_survives_a_kill_mid_case(tmp_path):
    study = tmp_path / "study"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(MODULE_DIR), str(study)])
    try:
        deadline = time.monotonic() + 60
        files: list[Path] = []
        while time.monotonic() < deadline:
            files = list(study.rglob("*.jsonl"))
            if files and files[0].read_bytes().count(b"\n") >= 200:
                break
            assert process.poll() is None, "the writer died on its own"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)  # no cleanup, no atexit, no flush: as in a crash
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    [path] = files
    data = path.read_bytes()
    # One os.write per line: the file ends on a newline and every line parses, however the kill fell.
    assert data.endswith(b"\n")
    records = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    assert len(records) >= 200 and records[-1]["event"] in ("pause", "resume")
    assert phases(str(path)) == [("initial_marker", 1.0), ("inference", 1.0)]  # only the running phase is lost

    study_module = pytest.importorskip("medsam_server.study")  # the summarizer lives in the server package
    warnings: list[str] = []
    [row] = study_module.table15(study_module.read_study(str(study), warn=warnings.append))
    assert (row.annotator, row.case, row.initial_marker, row.inference, row.refinement) == ("expert 1", "042", 1.0,
                                                                                           1.0, None)
    assert len(warnings) == 1 and "was not finished" in warnings[0]
