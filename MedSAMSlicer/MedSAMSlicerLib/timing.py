"""Timing-study recorder: the phases of one annotation case, as append-only JSON lines.

A study is a folder. Each recording session (one annotator, one case, one mode)
writes its own file, ``<study>/<annotator>/<case>-<mode>-<YYYYmmddTHHMMSS>.jsonl``,
one JSON object per line. Every line is written with a single ``os.write`` on an
``O_APPEND`` descriptor and then ``fsync``'d, so a crash or a kill loses at most
the phase that was running; the lines already written stay whole.

Phases (the columns of Table 15 in the MedSAM paper):

- assisted mode: ``initial_marker`` (case start -> Segment pressed), ``inference``
  (Segment pressed -> result applied; wall time, with the server's own compute
  seconds as a field), ``refinement`` (result applied -> Finish). Pressing Segment
  again during refinement starts another inference; the summary adds them up.
- manual mode: ``manual`` (case start -> Finish).

Paused time is excluded from a phase's ``seconds``. Every line repeats the
session's identity (annotator, case, mode, session id), so each line can be read
on its own even when a neighbour is damaged.

Standard library only: it runs inside Slicer and in headless tests alike.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

SCHEMA_VERSION = 1
MODES = ("manual", "assisted")


class TimingError(RuntimeError):
    """A recorder call out of order (e.g. Segment pressed before the case started)."""


def safe_file_part(text: str) -> str:
    """``text`` reduced to characters safe in a file name; the real value lives inside the records."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return cleaned or "unnamed"


class CaseRecorder:
    """Records the phases of one annotation case into a new JSON-lines file of a study folder.

    Typical assisted use (the Slicer module calls these from its buttons)::

        rec = CaseRecorder(study_dir, annotator="expert1", case="010", mode="assisted", target="adrenal tumor")
        rec.start()                   # Start case: initial_marker runs
        rec.begin_inference(keyframe_count=6, keyframe_spacing=5)   # Segment pressed
        rec.end_inference(server_seconds=3.2)                        # result applied: refinement runs
        rec.finish(slices_segmented=31)                              # Finish case

    ``clock`` returns seconds (monotonic by default); tests inject a fake one.
    """

    def __init__(
        self,
        study_dir: str,
        annotator: str,
        case: str,
        mode: str,
        target: str = "",
        clock: Callable[[], float] = time.monotonic,
        keyframe_count: int | None = None,
        keyframe_spacing: float | None = None,
    ) -> None:
        if mode not in MODES:
            raise TimingError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not str(annotator).strip() or not str(case).strip():
            raise TimingError("annotator and case must not be empty")
        self.study_dir = str(study_dir)
        self.annotator = str(annotator)
        self.case = str(case)
        self.mode = mode
        self.target = str(target)
        self.keyframe_count = keyframe_count
        self.keyframe_spacing = keyframe_spacing
        self.session = uuid.uuid4().hex
        self.path: str | None = None
        self._clock = clock
        self._fd: int | None = None
        self._started = False
        self._finished = False
        self._phase: str | None = None
        self._phase_start = 0.0
        self._phase_paused = 0.0  # paused seconds accumulated in the running phase
        self._paused_at: float | None = None
        self._active_seconds = 0.0  # sum of the phases already closed

    # -- state the UI shows ------------------------------------------------------------------------------------------

    @property
    def phase(self) -> str | None:
        """The running phase, or None before start and after finish."""
        return self._phase

    @property
    def paused(self) -> bool:
        return self._paused_at is not None

    @property
    def started(self) -> bool:
        return self._started

    @property
    def finished(self) -> bool:
        return self._finished

    def elapsed(self) -> float:
        """Active seconds since the case started (pauses excluded): the running clock a UI shows."""
        if self._phase is None:
            return self._active_seconds
        return self._active_seconds + self._running_seconds(self._now())

    # -- transitions -------------------------------------------------------------------------------------------------

    def start(self) -> str:
        """Start the case: opens the session file and starts ``manual`` or ``initial_marker``. Returns the file path."""
        if self.started:
            raise TimingError("the case has already been started")
        folder = os.path.join(self.study_dir, safe_file_part(self.annotator))
        os.makedirs(folder, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
        stem = f"{safe_file_part(self.case)}-{self.mode}-{stamp}"
        for attempt in range(1, 1000):
            path = os.path.join(folder, stem + ("" if attempt == 1 else f"-{attempt}") + ".jsonl")
            try:
                # O_EXCL: two sessions started in the same second never share a file.
                # (O_BINARY: Windows would otherwise rewrite each "\n" as "\r\n")
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_BINARY", 0)
                self._fd = os.open(path, flags, 0o644)
            except FileExistsError:
                continue
            self.path = path
            self._started = True
            break
        else:
            raise TimingError(f"could not create a new session file in {folder}")
        now = self._now()
        self._write(
            "case_start",
            t=now,
            wall=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            target=self.target,
            keyframe_count=self.keyframe_count,
            keyframe_spacing=self.keyframe_spacing,
        )
        self._open_phase("manual" if self.mode == "manual" else "initial_marker", now)
        return self.path

    def begin_inference(self, keyframe_count: int | None = None, keyframe_spacing: float | None = None) -> None:
        """Segment pressed (assisted mode): closes ``initial_marker`` or ``refinement`` and starts ``inference``.

        ``keyframe_count`` and ``keyframe_spacing`` (slices between keyframes) describe the prompts sent.
        """
        self._require_mode("assisted", "Segment")
        if self._phase not in ("initial_marker", "refinement"):
            raise TimingError(f"Segment pressed during {self._phase or 'no phase'}; "
                              "expected initial_marker or refinement")
        if keyframe_count is not None:
            self.keyframe_count = int(keyframe_count)
        if keyframe_spacing is not None:
            self.keyframe_spacing = float(keyframe_spacing)
        now = self._now()
        self._close_phase(now)
        self._open_phase("inference", now)

    def end_inference(self, server_seconds: float | None = None, ok: bool = True) -> None:
        """The result is applied (``ok``) or the run failed or was cancelled (not ``ok``).

        ``server_seconds`` is the server's own compute time for the run, stored beside the wall time.
        After a good run ``refinement`` starts; after a failed one the annotator is back to placing markers.
        """
        self._require_mode("assisted", "a result")
        if self._phase != "inference":
            raise TimingError(f"inference ended during {self._phase or 'no phase'}; press Segment first")
        now = self._now()
        self._close_phase(now, server_seconds=None if server_seconds is None else float(server_seconds), ok=bool(ok))
        self._open_phase("refinement" if ok else "initial_marker", now)

    def pause(self) -> None:
        """Stop the clock (a phone call, a break); the time until ``resume`` is excluded."""
        if self._phase is None:
            raise TimingError("nothing to pause: the case is not running")
        if self.paused:
            return  # a second press of Pause changes nothing
        self._paused_at = self._now()
        self._write("pause", t=self._paused_at, phase=self._phase)

    def resume(self) -> None:
        """Restart the clock after ``pause``."""
        if self._phase is None:
            raise TimingError("nothing to resume: the case is not running")
        if self._paused_at is None:
            return
        now = self._now()
        self._phase_paused += now - self._paused_at
        self._paused_at = None
        self._write("resume", t=now, phase=self._phase)

    def finish(self, slices_segmented: int | None = None) -> dict:
        """Finish the case: closes the running phase, writes ``case_end`` and closes the file.

        Returns the ``case_end`` record. Finishing during inference counts the run's time up to now.
        """
        if self._phase is None:
            raise TimingError("the case is not running" if not self._finished else "the case is already finished")
        now = self._now()
        self._close_phase(now)
        record = self._write(
            "case_end",
            t=now,
            slices_segmented=None if slices_segmented is None else int(slices_segmented),
            keyframe_count=self.keyframe_count,
            keyframe_spacing=self.keyframe_spacing,
            active_seconds=round(self._active_seconds, 6),
        )
        self._finished = True
        self.close()
        return record

    def close(self) -> None:
        """Close the file without finishing (the running phase is not recorded). Safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._phase = None

    # -- internals ---------------------------------------------------------------------------------------------------

    def _now(self) -> float:
        return float(self._clock())

    def _require_mode(self, mode: str, what: str) -> None:
        if self.mode != mode:
            raise TimingError(f"{what} belongs to {mode} mode; this case is recorded in {self.mode} mode")

    def _running_seconds(self, now: float) -> float:
        paused = self._phase_paused + (now - self._paused_at if self._paused_at is not None else 0.0)
        return max(0.0, now - self._phase_start - paused)

    def _open_phase(self, phase: str, now: float) -> None:
        self._phase = phase
        self._phase_start = now
        self._phase_paused = 0.0
        self._paused_at = None

    def _close_phase(self, now: float, **extra: Any) -> None:
        seconds = self._running_seconds(now)
        paused = self._phase_paused + (now - self._paused_at if self._paused_at is not None else 0.0)
        # rounded to microseconds: clock readings are exact, their float differences are not
        self._write("phase", phase=self._phase, start=self._phase_start, end=now, seconds=round(seconds, 6),
                    paused_seconds=round(paused, 6), **extra)
        self._active_seconds += seconds
        self._phase = None
        self._paused_at = None

    def _write(self, event: str, **fields: Any) -> dict:
        if self._fd is None:
            raise TimingError("the session file is closed")
        record = {"event": event, "schema": SCHEMA_VERSION, "session": self.session, "annotator": self.annotator,
                  "case": self.case, "mode": self.mode}
        record.update(fields)
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
        # One write per line (looping only on a short write) and fsync: a kill never leaves half a line behind
        # a finished one, and a finished line survives a power cut.
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
        return record
