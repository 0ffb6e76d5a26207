"""A simulated annotator: keyframe markers made from a reference segmentation.

It plays the radiologist of the paper's Table 15 headlessly: for each target it
marks every K-th slice of the reference's extent, always including the first and
the last slice (so the interpolated range covers the target), with the reference
slice's bounding box -- optionally jittered by up to J pixels per side, as MedSAM's
training perturbed its boxes -- or with RECIST lines (the longest diameter and the
longest diameter perpendicular to it).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .errors import InputError
from .geometry import slice_index


def keyframe_slices(present: np.ndarray, every: int) -> list[int]:
    """Every ``every``-th slice where the target is present, plus the last one."""
    if every < 1:
        raise InputError("--every must be >= 1 slice")
    slices = np.flatnonzero(present)
    chosen = list(slices[::every])
    if chosen[-1] != slices[-1]:
        chosen.append(slices[-1])
    return [int(s) for s in chosen]


def bounding_box(plane: np.ndarray) -> list[int]:
    """Inclusive [x_min, y_min, x_max, y_max] of a 2D mask (x = column)."""
    rows, cols = np.nonzero(plane)
    return [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]


def recist_lines(plane: np.ndarray) -> list[list[list[float]]]:
    """Long axis (the mask's longest diameter) and short axis (the longest chord perpendicular to it).

    Each axis spans at least one pixel, as a line drawn by hand does, so a target one
    pixel wide still gets two lines of non-zero length.
    """
    rows, cols = np.nonzero(plane)
    points = np.stack([cols, rows], axis=1).astype(np.float64)
    if len(points) > 2000:  # the diameter lies on the boundary; thin the interior for speed
        points = points[np.random.default_rng(0).choice(len(points), 2000, replace=False)]
    distances = ((points[:, None] - points[None]) ** 2).sum(-1)
    a, b = np.unravel_index(np.argmax(distances), distances.shape)
    direction = points[b] - points[a]
    direction = direction / np.linalg.norm(direction) if distances[a, b] > 0 else np.array([1.0, 0.0])
    normal = np.array([-direction[1], direction[0]])
    along, across = points @ direction, points @ normal
    long_axis = (points[a], points[b])
    short_axis, best = (points[a], points[a]), -1.0
    for position in np.unique(np.round(along)):  # chords perpendicular to the long axis
        chord = np.abs(along - position) <= 0.5
        lo, hi = np.argmin(np.where(chord, across, np.inf)), np.argmax(np.where(chord, across, -np.inf))
        if across[hi] - across[lo] > best:
            best, short_axis = across[hi] - across[lo], (points[lo], points[hi])
    limit = np.array([plane.shape[1] - 1.0, plane.shape[0] - 1.0])
    return [_at_least_one_pixel(*long_axis, direction, limit), _at_least_one_pixel(*short_axis, normal, limit)]


def _at_least_one_pixel(start: np.ndarray, end: np.ndarray, unit: np.ndarray, limit: np.ndarray) -> list[list[float]]:
    if np.linalg.norm(end - start) < 1.0:
        middle = (start + end) / 2.0
        start, end = np.clip(middle - unit / 2.0, 0.0, limit), np.clip(middle + unit / 2.0, 0.0, limit)
    return [start.tolist(), end.tolist()]


def simulated_prompts(
    reference: np.ndarray,
    targets: Sequence[tuple[str, int]],
    every: int,
    axis: int = 2,
    window="auto",
    jitter_px: int = 0,
    markers: str = "boxes",
    seed: int = 0,
) -> dict:
    """A prompt document (DESIGN.md section 4) marking each target of a (k, j, i) reference labelmap.

    ``targets`` are (segment name, reference label) pairs; ``markers`` is "boxes" or "lines".
    """
    if markers not in ("boxes", "lines"):
        raise InputError("markers must be 'boxes' or 'lines'")
    rng = np.random.default_rng(seed)
    n_slices = reference.shape[2 - axis]
    segments = []
    for position, (name, label) in enumerate(targets, start=1):
        target = reference == label
        present = np.array([target[slice_index(axis, s)].any() for s in range(n_slices)])
        if not present.any():
            raise InputError(f"the reference has no voxels of label {label} ({name!r})")
        entries = []
        for s in keyframe_slices(present, every):
            plane = target[slice_index(axis, s)]
            if markers == "lines":
                entries.extend({"slice": s, "points": line} for line in recist_lines(plane))
                continue
            box = np.array(bounding_box(plane), dtype=np.int64)
            if jitter_px:
                box = box + rng.integers(-jitter_px, jitter_px + 1, size=4)
                rows, cols = plane.shape
                box = np.clip(box, 0, [cols - 1, rows - 1, cols - 1, rows - 1])
                box[2:] = np.maximum(box[2:], box[:2] + 1)
            entries.append({"slice": s, "box": box.tolist()})
        segments.append({"name": name, "label": position, markers: entries})
    return {"axis": axis, "window": window if isinstance(window, str) else list(window), "segments": segments}


def target_labels(names_by_label: dict[int, str], wanted: Optional[Sequence[str]]) -> list[tuple[str, int]]:
    """(name, label) pairs for the requested segment names or labels (all when none are given)."""
    if not wanted:
        return [(name, label) for label, name in sorted(names_by_label.items()) if label]
    by_name = {name: label for label, name in names_by_label.items()}
    chosen = []
    for item in wanted:
        if item in by_name:
            chosen.append((item, by_name[item]))
        elif item.isdigit() and int(item) in names_by_label:
            chosen.append((names_by_label[int(item)], int(item)))
        else:
            known = ", ".join(f"{label}={name!r}" for label, name in sorted(names_by_label.items()) if label)
            raise InputError(f"the reference has no label or segment {item!r}; it has {known}")
    return chosen
