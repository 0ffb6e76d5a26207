"""`medsam study summarize`: the paper's Table 15, written through the real recorder, read back to one decimal."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest

from medsam_server.cli import main
from medsam_server.study import read_study, table15

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "MedSAMSlicer"))  # MedSAMSlicerLib is not an installed package
from MedSAMSlicerLib.timing import CaseRecorder  # noqa: E402

PAPER_ROWS = Path(__file__).parent / "data" / "table15_paper.csv"  # a copy of shared/paper/table15.csv
PAPER_AVERAGES = {  # the paper's average rows: manual, initial marker, inference, refinement
    "expert 1": (2237.7, 117.5, 12.2, 264.8),
    "expert 2": (2145.0, 97.4, 13.5, 254.9),
}
PAPER_TIME_SAVED = {"expert 1": 82.37, "expert 2": 82.95}  # the paper's text: time reduced by 82.37 % and 82.95 %


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def paper_rows() -> list[dict]:
    with open(PAPER_ROWS, encoding="utf-8") as stream:
        return list(csv.DictReader(line for line in stream if not line.startswith("#")))


def record_paper_study(study: Path) -> None:
    """Write the 20 rows as manual and assisted sessions, with breaks that the recorder must leave out."""
    for n, row in enumerate(paper_rows()):
        annotator, clock = f"expert {row['expert']}", FakeClock()
        manual = CaseRecorder(str(study), annotator, row["case"], "manual", target="adrenal tumor", clock=clock)
        manual.start()
        clock.advance(float(row["manual"]) / 2)
        manual.pause()
        clock.advance(900.0)  # a coffee break
        manual.resume()
        clock.advance(float(row["manual"]) / 2)
        manual.finish(slices_segmented=40)

        assisted = CaseRecorder(str(study), annotator, row["case"], "assisted", target="adrenal tumor", clock=clock)
        assisted.start()
        clock.advance(float(row["initial_marker"]))
        assisted.begin_inference(keyframe_count=8, keyframe_spacing=5)
        clock.advance(float(row["medsam_inference"]))
        assisted.end_inference(server_seconds=float(row["medsam_inference"]) * 0.8)
        clock.advance(float(row["refinement"]) - 7.0)
        if n % 3 == 0:
            assisted.pause()
            clock.advance(300.0)
            assisted.resume()
        clock.advance(7.0)
        assisted.finish(slices_segmented=40)


def read_csv_table(path: Path) -> dict[tuple[str, str], dict]:
    with open(path, encoding="utf-8") as stream:
        return {(r["annotator"], r["case"]): r for r in csv.DictReader(stream)}


def test_paper_table15_is_reproduced(tmp_path, capsys):
    study, out = tmp_path / "study", tmp_path / "summary"
    record_paper_study(study)
    assert len(list(study.rglob("*.jsonl"))) == 40

    assert main(["study", "summarize", str(study), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert sorted(os.listdir(out)) == ["table15.csv", "table15.md", "table15.png"]
    table = read_csv_table(out / "table15.csv")
    columns = ("manual", "initial_marker", "inference", "refinement")
    for annotator, expected in PAPER_AVERAGES.items():
        average = table[(annotator, "average")]
        assert tuple(round(float(average[c]), 1) for c in columns) == expected
        assert round(float(average["time_saved_pct"]), 2) == PAPER_TIME_SAVED[annotator]
    for row in paper_rows():
        got = table[(f"expert {row['expert']}", row["case"])]
        for column, source in zip(columns, ("manual", "initial_marker", "medsam_inference", "refinement"), strict=True):
            assert float(got[column]) == pytest.approx(float(row[source]), abs=1e-3)
    # Case 010 of expert 1: 2279 s by hand, 150 + 31.04 + 790 s with MedSAM.
    assert float(table[("expert 1", "010")]["assisted_total"]) == pytest.approx(971.04)
    assert float(table[("expert 1", "010")]["time_saved_pct"]) == pytest.approx(100 * (1 - 971.04 / 2279), abs=1e-3)

    markdown = (out / "table15.md").read_text()
    expected_row = ["expert 1", "average", "2237.7", "117.5", "12.2", "264.8", "394.5", "82.4"]
    assert "| " + " | ".join(f"**{cell}**" for cell in expected_row) + " |" in markdown
    assert captured.out == markdown  # the same table goes to stdout
    assert "warning" not in captured.err
    assert (out / "table15.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corrupted_lines_are_skipped_with_a_warning_naming_the_line(tmp_path, capsys):
    study = tmp_path / "study"
    clock = FakeClock()
    rec = CaseRecorder(str(study), "ann", "c1", "assisted", clock=clock)
    path = Path(rec.start())
    clock.advance(60.0)
    rec.begin_inference()
    clock.advance(5.0)
    rec.end_inference()
    clock.advance(100.0)
    rec.finish()
    manual = CaseRecorder(str(study), "ann", "c1", "manual", clock=clock)
    manual.start()
    clock.advance(1000.0)
    manual.finish()
    lines = path.read_text().splitlines(keepends=True)
    lines.insert(2, "{this is not json\n")  # becomes line 3
    path.write_text("".join(lines) + '{"event": "phase", "phase": "refinem')  # a torn last line (line 7)

    assert main(["study", "summarize", str(study), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"{path}, line 3: not valid JSON" in err and f"{path}, line 7: not valid JSON" in err
    row = read_csv_table(tmp_path / "out" / "table15.csv")[("ann", "c1")]
    assert (float(row["initial_marker"]), float(row["inference"]), float(row["refinement"])) == (60.0, 5.0, 100.0)
    assert float(row["time_saved_pct"]) == pytest.approx(83.5)


def test_records_that_do_not_fit_are_named(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    (study / "odd.jsonl").write_text(
        '{"event": "phase", "annotator": "a", "case": "1", "mode": "manual", "phase": "refinement", "seconds": 3}\n'
        '{"event": "phase", "annotator": "a", "case": "1", "mode": "sideways", "phase": "manual", "seconds": 3}\n'
        '{"event": "phase", "annotator": "a", "case": "1", "mode": "manual", "phase": "manual", "seconds": -1}\n'
        '{"event": "phase", "annotator": "a", "case": "1", "mode": "manual", "phase": "manual", "seconds": 30}\n')
    messages: list[str] = []
    sessions = read_study(str(study), warn=messages.append)
    assert any("line 1: phase 'refinement' does not belong to manual mode" in m for m in messages)
    assert any("line 2: mode 'sideways'" in m for m in messages)
    assert any("line 3: phase seconds -1" in m for m in messages)
    assert any("was not finished" in m for m in messages)
    [row] = table15(sessions)
    assert row.manual == 30.0 and row.assisted_total is None


@pytest.mark.parametrize("content", [None, "", "garbage\n"])
def test_empty_or_unusable_study_folder_exits_2(tmp_path, capsys, content):
    study = tmp_path / "study"
    study.mkdir()
    if content is not None:
        (study / "a.jsonl").write_text(content)
    assert main(["study", "summarize", str(study)]) == 2
    err = capsys.readouterr().err
    expected = "holds no .jsonl records" if content is None else "holds no valid timing records"
    assert f"medsam study: error: study folder {study} {expected}" in err
    assert not (study / "summary").exists()


def test_missing_study_folder_exits_2(tmp_path, capsys):
    assert main(["study", "summarize", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
