"""Slice geometry: which axes a slice spans, boxes and points on it, and the in-plane view the model sees.

Frames (numpy only):
- *volume array*: numpy ``(k, j, i)`` as SimpleITK's ``GetArrayFromImage`` gives it,
  plus a trailing channel axis of 3 for RGB.
- *slice pixels*: a 2D slice ``(rows, cols)`` along prompt ``axis``; columns run along
  u and rows along v (:func:`in_plane_axes`); a box is ``[x_min, y_min, x_max, y_max]``
  with x = column and y = row, inclusive pixel indices.
- *view pixels*: the slice after :class:`SliceView` turned it into the orientation in
  which it reaches the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .errors import InputError, shown


def in_plane_axes(axis: int) -> tuple[int, int]:
    """Index axes (u, v) of a slice taken along ``axis``; slice columns run along u, rows along v."""
    u, v = (a for a in (0, 1, 2) if a != axis)
    return u, v


def slice_index(axis: int, index: int) -> tuple:
    """Numpy index of slice ``index`` along prompt axis ``axis`` of a (k, j, i[, c]) array (a view, writable)."""
    where: list = [slice(None)] * 3
    where[2 - axis] = index
    return tuple(where)


def slice_shape(size_ijk: Sequence[int], axis: int) -> tuple[int, int]:
    """(rows, cols) of a slice along ``axis`` of a volume of size (i, j, k)."""
    u, v = in_plane_axes(axis)
    return int(size_ijk[v]), int(size_ijk[u])


def check_box(box: Sequence[float], shape: tuple[int, int], where: str = "") -> tuple[np.ndarray, Optional[str]]:
    """Validate an inclusive ``[x_min, y_min, x_max, y_max]`` box on a ``(rows, cols)`` slice.

    Inclusive voxel indices: ``x_min == x_max`` is a box one voxel wide (a target's first or
    last slice, as real and simulated annotators mark it), valid like any other. A box partly
    outside the slice is clipped; the note says so. Reversed and wholly outside boxes are
    errors, since no mask could honestly answer them.
    """
    prefix = f"{where}: " if where else ""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise InputError(f"{prefix}a box is [x_min, y_min, x_max, y_max], got {shown(box)}") from None
    if not all(np.isfinite(v) for v in (x0, y0, x1, y1)):
        raise InputError(f"{prefix}box {list(box)} has a non-finite coordinate")
    if x1 < x0 or y1 < y0:
        raise InputError(f"{prefix}box {list(box)} is reversed (min > max)")
    rows, cols = shape
    if x1 < 0 or y1 < 0 or x0 > cols - 1 or y0 > rows - 1:
        raise InputError(f"{prefix}box {list(box)} lies outside the {cols}x{rows} slice")
    clipped = np.array([max(x0, 0.0), max(y0, 0.0), min(x1, cols - 1.0), min(y1, rows - 1.0)])
    note = None
    if not np.array_equal(clipped, [x0, y0, x1, y1]):
        note = f"{prefix}box {list(box)} clipped to {clipped.tolist()} (the slice is {cols}x{rows})"
    return clipped, note


def check_points(points: Any, shape: tuple[int, int], what: str, count: tuple[int, int], where: str) -> np.ndarray:
    """Validate ``count[0]..count[1]`` (u, v) points inside a ``(rows, cols)`` slice -> (P, 2) float64.

    ``what`` is how the message spells the expected value (e.g. ``a line is two points [[u, v], [u, v]]``).
    """
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        array = np.empty((0, 3))
    low, high = count
    if array.ndim != 2 or array.shape[1:] != (2,) or not low <= len(array) <= high or not np.isfinite(array).all():
        raise InputError(f"{where}: {what}, got {shown(points)}")
    rows, cols = shape
    if (array < 0).any() or (array[:, 0] > cols - 1).any() or (array[:, 1] > rows - 1).any():
        raise InputError(f"{where}: a point lies outside the {cols}x{rows} slice ({np.round(array, 3).tolist()})")
    return array


def changed_block(labels: np.ndarray, changed: Sequence[int],
                  axis: int) -> tuple[tuple[int, int, int], Optional[np.ndarray]]:
    """The sub-block of ``labels`` (k, j, i) that a client must write, and its (i0, j0, k0) offset.

    Along ``axis`` it spans the first to the last changed slice; in-plane it is the
    bounding box of every labelled voxel of those slices (at least one voxel), so the
    block is the complete answer for its slices. None when nothing changed.
    """
    if not changed:
        return (0, 0, 0), None
    lo, hi = min(changed), max(changed) + 1
    where: list = [slice(None)] * 3
    where[2 - axis] = slice(lo, hi)
    offset = [0, 0, 0]
    offset[axis] = lo
    slab = labels[tuple(where)]
    for numpy_axis in range(3):
        if numpy_axis == 2 - axis:
            continue
        others = tuple(a for a in range(3) if a != numpy_axis)
        present = np.flatnonzero(slab.any(axis=others))
        start, stop = (int(present[0]), int(present[-1]) + 1) if present.size else (0, 1)
        where[numpy_axis] = slice(start, stop)
        offset[2 - numpy_axis] = start
    return (offset[0], offset[1], offset[2]), np.ascontiguousarray(labels[tuple(where)])


@dataclass(frozen=True)
class SliceView:
    """An exact in-plane turn of a slice: optional transpose, then optional flips.

    ``to_view`` and ``from_view`` are inverse; boxes and points map with them exactly.
    """

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @property
    def key(self) -> str:
        return f"T{int(self.transpose)}R{int(self.flip_rows)}C{int(self.flip_cols)}"

    def to_view(self, image: np.ndarray) -> np.ndarray:
        """``(rows, cols[, C])`` slice -> view pixels."""
        out = np.swapaxes(image, 0, 1) if self.transpose else image
        if self.flip_rows:
            out = out[::-1]
        if self.flip_cols:
            out = out[:, ::-1]
        return out

    def from_view(self, image: np.ndarray) -> np.ndarray:
        out = image
        if self.flip_cols:
            out = out[:, ::-1]
        if self.flip_rows:
            out = out[::-1]
        return np.swapaxes(out, 0, 1) if self.transpose else out

    def points_to_view(self, points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(..., 2) (x, y) points in slice pixels of a ``(rows, cols)`` slice -> view pixels."""
        out = np.array(points, dtype=np.float64)
        rows, cols = shape
        if self.transpose:
            out = out[..., ::-1].copy()
            rows, cols = cols, rows
        if self.flip_rows:
            out[..., 1] = rows - 1 - out[..., 1]
        if self.flip_cols:
            out[..., 0] = cols - 1 - out[..., 0]
        return out

    def box_to_view(self, box: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
        """Box in slice pixels of a ``(rows, cols)`` slice -> box (min corner first) in view pixels."""
        corners = self.points_to_view(np.asarray(box, dtype=np.float64).reshape(2, 2), shape)
        return np.concatenate([corners.min(axis=0), corners.max(axis=0)])

    def view_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        return (shape[1], shape[0]) if self.transpose else (shape[0], shape[1])


IDENTITY_VIEW = SliceView()

# Unit vectors in LPS of the patient directions used below.
_R, _A, _S = np.array([-1.0, 0.0, 0.0]), np.array([0.0, -1.0, 0.0]), np.array([0.0, 0.0, 1.0])

#: In-plane conventions, per slice plane (the patient axis the slice normal follows: 0 sagittal,
#: 1 coronal, 2 axial), as (LPS direction along view columns, LPS direction down view rows).
#: ``ras``: slices appear as they do in the array of a volume stored in RAS order (nibabel's
#: closest-canonical, MONAI's Orientation("RAS")), which many of MedSAM's NIfTI training sets are.
#: ``radiological``: the reading-room view (axial: patient right on the left, anterior on top;
#: coronal: right on the left, superior on top; sagittal: anterior on the left, superior on top).
VIEW_CONVENTIONS: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {
    "ras": {0: (_A, _S), 1: (_R, _S), 2: (_R, _A)},
    "radiological": {0: (-_A, -_S), 1: (_R, -_S), 2: (_R, -_A)},
}
#: ``array`` keeps the slice as the file stores it (no reorientation).
ORIENTATIONS = ("ras", "radiological", "array")
DEFAULT_ORIENTATION = "ras"


def canonical_view(direction: np.ndarray, axis: int, orientation: str = DEFAULT_ORIENTATION) -> SliceView:
    """The :class:`SliceView` that shows a slice along ``axis`` in a fixed patient orientation.

    ``direction`` is the 3x3 LPS direction matrix whose columns are the i, j, k axes
    (SimpleITK's ``GetDirection`` reshaped); oblique volumes take the nearest plane.
    Because the view depends on the patient frame only, the same anatomy reaches the
    model the same way however the file orders its voxels.
    """
    if orientation == "array":
        return IDENTITY_VIEW
    if orientation not in VIEW_CONVENTIONS:
        raise InputError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    plane = int(np.argmax(np.abs(direction[:, axis])))
    want_cols, want_rows = VIEW_CONVENTIONS[orientation][plane]
    u, v = in_plane_axes(axis)
    du, dv = direction[:, u], direction[:, v]
    straight = abs(du @ want_cols) + abs(dv @ want_rows)
    swapped = abs(dv @ want_cols) + abs(du @ want_rows)
    transpose = swapped > straight
    cols_dir, rows_dir = (dv, du) if transpose else (du, dv)
    return SliceView(transpose=bool(transpose), flip_rows=bool(rows_dir @ want_rows < 0),
                     flip_cols=bool(cols_dir @ want_cols < 0))
