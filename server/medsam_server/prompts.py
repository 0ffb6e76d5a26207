"""The prompt document (README, "The command line"): parse, validate, and map to slice boxes.

Frames: the document speaks in voxel indices (i, j, k). Slices are taken along
``axis``; u and v are the two other axes in increasing order, so on a slice a box
``[u_min, v_min, u_max, v_max]`` is ``[x_min, y_min, x_max, y_max]`` with columns
along u and rows along v (see ``geometry.in_plane_axes``).

RECIST lines: every line drawn on a slice (long and short axis) joins one
rectangle that encloses all their end points, grown by ``LINE_MARGIN_FRACTION``
of its side on each side (at least one voxel) so that the lesion's edge, which
the axes only touch, falls inside the box.

The small JSON validators at the end (keys, integers, axis, orientation) are shared
with ``requests.py``, which parses the server's other request bodies.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np

from .errors import InputError, shown
from .geometry import ORIENTATIONS, check_box, check_points, slice_shape
from .intensity import parse_window
from .protocol import MAX_LABEL, MAX_SEGMENTS

LINE_MARGIN_FRACTION = 0.1

_DOCUMENT_KEYS = {"axis", "window", "segments"}
_SEGMENT_KEYS = {"name", "label", "boxes", "lines", "locked_slices", "code", "window"}


@dataclass(frozen=True)
class Keyframe:
    """A marked slice: its index along the axis and a box in slice pixels (x = u, y = v)."""

    slice: int
    box: tuple[float, float, float, float]
    source: str  # "box" or "lines"


@dataclass
class SegmentPrompt:
    name: str
    label: int
    keyframes: list[Keyframe]  # sorted by slice, one per slice
    locked_slices: tuple[int, ...] = ()
    code: Any = None  # the user's DICOM code for a SEG output, checked by io.dicomseg.segment_code
    window: Any = None  # this segment's own window (e.g. the spine in ct-bone); None: the document's


@dataclass
class PromptDocument:
    axis: int
    window: Union[str, tuple[float, float]]
    segments: list[SegmentPrompt]
    notes: list[str] = field(default_factory=list)  # boxes clipped to the slice, and the like

    def window_of(self, segment: SegmentPrompt) -> Union[str, tuple[float, float]]:
        """The window ``segment`` is seen in: its own when it names one, else the document's."""
        return self.window if segment.window is None else segment.window


def line_box(lines: Sequence[np.ndarray], shape: tuple[int, int]) -> list[float]:
    """The margin-grown rectangle around RECIST line end points ``(n, 2, 2)`` as (u, v)."""
    points = np.concatenate([np.asarray(line, dtype=np.float64) for line in lines])
    lo, hi = points.min(axis=0), points.max(axis=0)
    margin = np.maximum(1.0, LINE_MARGIN_FRACTION * (hi - lo))
    lo, hi = lo - margin, hi + margin
    rows, cols = shape
    lo = np.maximum(lo, 0.0)
    hi = np.minimum(hi, [cols - 1.0, rows - 1.0])
    return [lo[0], lo[1], hi[0], hi[1]]


def parse_prompts(document: Union[dict, str], size_ijk: Sequence[int]) -> PromptDocument:
    """Validate a prompt document against a volume of size (i, j, k).

    Raises InputError naming the segment, the slice and what is wrong.
    """
    if isinstance(document, (str, bytes)):
        try:
            document = json.loads(document)
        except json.JSONDecodeError as err:
            raise InputError(f"the prompt document is not valid JSON: {err}") from None
    if not isinstance(document, dict):
        raise InputError("the prompt document must be a JSON object with 'segments'")
    no_unknown_keys(document, _DOCUMENT_KEYS, "the prompt document")
    axis = check_axis(document.get("axis", 2))
    window = parse_window(document.get("window", "auto"))
    raw_segments = document.get("segments")
    if not isinstance(raw_segments, list) or not raw_segments:
        raise InputError("the prompt document needs a non-empty 'segments' list")
    if len(raw_segments) > MAX_SEGMENTS:
        raise InputError(f"the prompt document has {len(raw_segments)} segments; the limit is {MAX_SEGMENTS}")

    n_slices = int(size_ijk[axis])
    shape = slice_shape(size_ijk, axis)
    notes: list[str] = []
    segments = [
        _parse_segment(raw, position, n_slices, shape, notes) for position, raw in enumerate(raw_segments, start=1)
    ]
    for attribute in ("label", "name"):
        counts = Counter(getattr(s, attribute) for s in segments)
        duplicates = sorted((v for v, n in counts.items() if n > 1), key=str)
        if duplicates:
            raise InputError(
                f"segments share the {attribute} {duplicates[0]!r}: each segment needs its own {attribute}")
    return PromptDocument(axis=axis, window=window, segments=segments, notes=notes)


def _slice_index(value: Any, n: int, where: str, what: str = "slice") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"{where}: {what} must be an integer index, got {value!r}")
    if not 0 <= value < n:
        raise InputError(
            f"{where}: {what} {value} is out of range (the volume has {n} slices along the axis: 0..{n - 1})")
    return value


def _parse_segment(raw: Any, position: int, n_slices: int, shape: tuple[int, int], notes: list[str]) -> SegmentPrompt:
    if not isinstance(raw, dict):
        raise InputError(f"segment {position} must be an object")
    name = raw.get("name", f"segment {position}")
    where = f"segment {name!r}"
    no_unknown_keys(raw, _SEGMENT_KEYS, where)
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"segment {position}: name must be a non-empty string")
    label = raw.get("label", position)
    if not isinstance(label, int) or isinstance(label, bool) or not 1 <= label <= MAX_LABEL:
        raise InputError(f"{where}: label must be an integer 1..{MAX_LABEL}, got {label!r}")
    window = None
    if "window" in raw:
        try:
            window = parse_window(raw["window"])
        except InputError as err:
            raise InputError(f"{where}: {err}") from None
    keyframes = _box_keyframes(raw, where, n_slices, shape, notes)
    for index, lines in sorted(_lines_by_slice(raw, where, n_slices, shape).items()):
        if index in keyframes:
            raise InputError(f"{where}, slice {index}: has both a box and lines; keep one kind per slice")
        keyframes[index] = Keyframe(index, tuple(line_box(lines, shape)), "lines")
    if not keyframes:
        raise InputError(f"{where}: needs at least one box or line")
    locked = tuple(sorted({_slice_index(s, n_slices, where, "locked slice")
                           for s in _list(raw, "locked_slices", where)}))
    return SegmentPrompt(name=name.strip(), label=label, keyframes=[keyframes[k] for k in sorted(keyframes)],
                         locked_slices=locked, code=raw.get("code"), window=window)


def _box_keyframes(raw: dict, where: str, n_slices: int, shape: tuple[int, int],
                   notes: list[str]) -> dict[int, Keyframe]:
    keyframes: dict[int, Keyframe] = {}
    for entry in _list(raw, "boxes", where):
        if not isinstance(entry, dict) or set(entry) != {"slice", "box"}:
            raise InputError(
                f"{where}: each box is {{\"slice\": k, \"box\": [u_min, v_min, u_max, v_max]}}, got {shown(entry)}")
        index = _slice_index(entry["slice"], n_slices, where)
        if index in keyframes:
            raise InputError(f"{where}, slice {index}: two boxes on one slice; keep one")
        box, note = check_box(entry["box"], shape, f"{where}, slice {index}")
        if note:
            notes.append(note)
        keyframes[index] = Keyframe(index, tuple(box.tolist()), "box")
    return keyframes


def _lines_by_slice(raw: dict, where: str, n_slices: int, shape: tuple[int, int]) -> dict[int, list[np.ndarray]]:
    lines: dict[int, list[np.ndarray]] = {}
    for entry in _list(raw, "lines", where):
        if not isinstance(entry, dict) or set(entry) != {"slice", "points"}:
            raise InputError(f"{where}: each line is {{\"slice\": k, \"points\": [[u, v], [u, v]]}}, "
                             f"got {shown(entry)}")
        index = _slice_index(entry["slice"], n_slices, where)
        at = f"{where}, slice {index}"
        points = check_points(entry["points"], shape, "a line is two points [[u, v], [u, v]]", (2, 2), at)
        if np.allclose(points[0], points[1]):
            raise InputError(f"{at}: line {points.tolist()} has zero length")
        lines.setdefault(index, []).append(points)
    return lines


def _list(raw: dict, key: str, where: str) -> list:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise InputError(f"{where}: {key!r} must be a list")
    return value


# ------------------------------------------------------------------ JSON validators (shared with requests.py)


def no_unknown_keys(raw: dict, allowed: set, where: str) -> None:
    unknown = sorted(map(str, set(raw) - allowed))
    if unknown:
        raise InputError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(sorted(allowed))}")


def check_int(value: Any, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"{what} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InputError(f"{what} {value} is out of range {low}..{high}")
    return value


def check_axis(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value not in (0, 1, 2):
        raise InputError(f"axis must be 0, 1 or 2, got {value!r}")
    return value


def check_orientation(value: Any) -> str:
    if value not in ORIENTATIONS:
        raise InputError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {value!r}")
    return value
