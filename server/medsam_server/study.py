"""Timing-study reports: a folder of JSON-lines records -> the MedSAM paper's Table 15.

The records are written by ``MedSAMSlicerLib/timing.py`` (one file per session, one
event per line; see that module for the format). Here every ``*.jsonl`` under the
study folder is read; a line that is not a valid record is skipped with a warning
naming its file and line. Per annotator and case the phases are added up over all
sessions (an annotator may finish a case in a new session after a crash; a session
that never finished counts the phases it recorded, with a warning).

Table 15 columns, in seconds: Manual, Initial marker, MedSAM inference (wall time),
Refinement, Assisted total (the three assisted phases), Time saved % (1 - assisted /
manual). Each annotator's average row is the column means over the cases that have
both a manual and an assisted record; its time saved is ``1 - mean assisted / mean
manual`` (the paper's 82.37 % for expert 1 is computed that way).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from .errors import InputError
from .plots import study_bars

MODES = ("manual", "assisted")
PHASES_BY_MODE = {"manual": ("manual",), "assisted": ("initial_marker", "inference", "refinement")}
COLUMNS = (
    ("manual", "Manual (s)"),
    ("initial_marker", "Initial marker (s)"),
    ("inference", "MedSAM inference (s)"),
    ("refinement", "Refinement (s)"),
    ("assisted_total", "Assisted total (s)"),
    ("time_saved_pct", "Time saved (%)"),
)
AVERAGE = "average"

Warn = Callable[[str], None]


@dataclass
class RecordedSession:
    """One recording session as read back: its identity and the seconds per phase it recorded."""

    path: str
    session: str
    annotator: str
    case: str
    mode: str
    target: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    server_seconds: float = 0.0
    finished: bool = False
    slices_segmented: Optional[int] = None
    keyframe_count: Optional[int] = None
    keyframe_spacing: Optional[float] = None


@dataclass
class Row:
    """One line of Table 15: an annotator's case, or (``case == "average"``) the annotator's averages."""

    annotator: str
    case: str
    manual: Optional[float] = None
    initial_marker: Optional[float] = None
    inference: Optional[float] = None
    refinement: Optional[float] = None

    @property
    def assisted_total(self) -> Optional[float]:
        parts = (self.initial_marker, self.inference, self.refinement)
        return None if any(p is None for p in parts) else sum(parts)

    @property
    def time_saved_pct(self) -> Optional[float]:
        total = self.assisted_total
        if self.manual is None or total is None or self.manual <= 0:
            return None
        return 100.0 * (1.0 - total / self.manual)

    def value(self, column: str) -> Optional[float]:
        return getattr(self, column)


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_study(study_dir: str, warn: Optional[Warn] = None) -> list[RecordedSession]:
    """Read every ``*.jsonl`` under ``study_dir`` into sessions.

    Damaged or out-of-place lines are skipped through ``warn`` (default: ``warnings.warn``), naming
    file and line. Raises InputError when the folder is missing or holds no usable record.
    """
    warn = warn or (lambda message: warnings.warn(message, stacklevel=2))
    if not os.path.isdir(study_dir):
        raise InputError(f"study folder {study_dir} does not exist")
    files = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(study_dir)
        for name in names
        if name.endswith(".jsonl")
    )
    if not files:
        raise InputError(f"study folder {study_dir} holds no .jsonl records")
    sessions: dict[tuple[str, str], RecordedSession] = {}
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as stream:
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                problem = _read_line(path, line, sessions)
                if problem:
                    warn(f"{path}, line {number}: {problem}; line skipped")
    if not sessions:
        raise InputError(f"study folder {study_dir} holds no valid timing records ({len(files)} file(s) read)")
    for s in sessions.values():
        if not s.finished:
            recorded = ", ".join(f"{p} {v:.1f} s" for p, v in s.seconds.items()) or "no phase"
            warn(f"{s.path}: {s.mode} session of case {s.case} by {s.annotator} was not finished; "
                 f"counted what it recorded ({recorded})")
    return list(sessions.values())


def _read_line(path: str, line: str, sessions: dict[tuple[str, str], RecordedSession]) -> str:
    """Fold one line into ``sessions``; return a description of the problem, or '' when it was fine."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg})"
    if not isinstance(record, dict):
        return "not a JSON object"
    annotator, case, mode = record.get("annotator"), record.get("case"), record.get("mode")
    if not all(isinstance(v, str) and v for v in (annotator, case)):
        return "no annotator or case"
    if mode not in MODES:
        return f"mode {mode!r} is not one of {', '.join(MODES)}"
    key = (path, str(record.get("session", "")))
    session = sessions.get(key)
    if session is None:
        session = RecordedSession(path=path, session=key[1], annotator=annotator, case=case, mode=mode)
    elif (session.annotator, session.case, session.mode) != (annotator, case, mode):
        return "annotator, case or mode differs from the rest of its session"
    problem = _apply_event(session, record, mode)
    if problem:
        return problem
    for name in ("keyframe_count", "keyframe_spacing"):
        if _number(record.get(name)):
            setattr(session, name, record[name])
    sessions[key] = session
    return ""


def _apply_event(session: RecordedSession, record: dict, mode: str) -> str:
    """Fold one event into its session; return the problem, or '' when it was fine."""
    event = record.get("event")
    if event == "case_start":
        session.target = str(record.get("target") or "")
    elif event == "phase":
        phase, seconds = record.get("phase"), record.get("seconds")
        if phase not in PHASES_BY_MODE[mode]:
            return f"phase {phase!r} does not belong to {mode} mode"
        if not _number(seconds) or seconds < 0:
            return f"phase seconds {seconds!r} is not a number >= 0"
        session.seconds[phase] = session.seconds.get(phase, 0.0) + float(seconds)
        if _number(record.get("server_seconds")):
            session.server_seconds += float(record["server_seconds"])
    elif event == "case_end":
        session.finished = True
        session.slices_segmented = record.get("slices_segmented")
    elif event not in ("pause", "resume"):
        return f"unknown event {event!r}"
    return ""


def table15(sessions: list[RecordedSession]) -> list[Row]:
    """Rows per annotator (natural order) and case, each annotator's block followed by its average row."""
    rows: dict[tuple[str, str], Row] = {}
    for s in sessions:
        row = rows.setdefault((s.annotator, s.case), Row(s.annotator, s.case))
        for phase in PHASES_BY_MODE[s.mode]:
            if phase in s.seconds or s.finished:
                setattr(row, phase, (row.value(phase) or 0.0) + s.seconds.get(phase, 0.0))
    table: list[Row] = []
    for annotator in sorted({a for a, _ in rows}, key=_natural_key):
        block = [rows[key] for key in sorted(rows, key=lambda k: _natural_key(k[1])) if key[0] == annotator]
        table.extend(block)
        complete = [r for r in block if r.manual is not None and r.assisted_total is not None]
        if complete:
            table.append(Row(annotator, AVERAGE, *(
                sum(r.value(c) for r in complete) / len(complete)
                for c in ("manual", "initial_marker", "inference", "refinement"))))
    return table


def incomplete_rows(table: list[Row]) -> list[Row]:
    """Case rows that lack the manual or the assisted time, so they stay out of the average."""
    return [r for r in table if r.case != AVERAGE and (r.manual is None or r.assisted_total is None)]


def write_csv(table: list[Row], path: str) -> None:
    """Table 15 as CSV: annotator, case, then the six columns in seconds (and %), blank where unknown."""
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["annotator", "case", *(name for name, _ in COLUMNS)])
        for row in table:
            writer.writerow([row.annotator, row.case,
                             *("" if row.value(c) is None else f"{row.value(c):.3f}" for c, _ in COLUMNS)])


def to_markdown(table: list[Row], notes: Optional[list[str]] = None) -> str:
    """Table 15 as a Markdown table (one decimal), average rows in bold, then any notes as a list."""
    header = ["Annotator", "Case", *(title for _, title in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(COLUMNS)) + "|"]
    for row in table:
        cells = [row.annotator, row.case, *("–" if row.value(c) is None else f"{row.value(c):.1f}" for c, _ in COLUMNS)]
        if row.case == AVERAGE:
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines.extend(f"- {note}" for note in notes)
    return "\n".join(lines) + "\n"


def summarize(study_dir: str, out_dir: str, warn: Optional[Warn] = None) -> tuple[list[Row], dict[str, str]]:
    """Read ``study_dir`` and write ``table15.csv``, ``table15.md`` and ``table15.png`` into ``out_dir``.

    Returns the table and the written paths by kind. Raises InputError when nothing can be summarized.
    """
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(message)

    table = table15(read_study(study_dir, warn=note))
    for row in incomplete_rows(table):
        missing = "manual" if row.manual is None else "assisted"
        note(f"case {row.case} of {row.annotator} has no {missing} record; left out of the average")
    os.makedirs(out_dir, exist_ok=True)
    paths = {kind: os.path.join(out_dir, f"table15.{kind}") for kind in ("csv", "md", "png")}
    write_csv(table, paths["csv"])
    with open(paths["md"], "w", encoding="utf-8") as stream:
        stream.write(to_markdown(table, notes))
    study_bars(table, paths["png"], AVERAGE)
    return table, paths
