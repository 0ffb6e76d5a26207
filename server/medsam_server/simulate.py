"""A simulated annotator: keyframe markers made from a reference segmentation.

It plays the radiologist of the paper's Table 15 headlessly: for each target it
marks every K-th slice of the reference's extent, always including the first and
the last slice (so the interpolated range covers the target), with the reference
slice's bounding box -- optionally jittered by up to J pixels per side, as MedSAM's
training perturbed its boxes -- or with RECIST lines (the longest diameter and the
longest diameter perpendicular to it).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from .errors import InputError
from .geometry import slice_index

#: ``medsam simulate --ablation``: issue 15's stages in turn, as changes to the annotate options given.
ABLATION = (("model alone", {"intensity_weight": 0.0}),
            ("default", {}),
            ("+ box margin 10 %", {"box_margin": 0.1}),
            ("+ three views", {"views": True}))


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
    """A prompt document (README, "The command line") marking each target of a (k, j, i) reference labelmap.

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


# ------------------------------------------------------------------ corrective clicks (issue 14)


def corrective_click(predicted: np.ndarray, reference: np.ndarray) -> Optional[tuple[list[float], int]]:
    """The simulated annotator's next click on one slice: ``([u, v], label)`` or None when nothing is wrong.

    The standard protocol: the largest connected error region (false negatives and false positives each
    form their own regions), clicked at its pixel farthest from the region's border; label 1 (inside) in a
    missed region, 0 (outside) in a wrong one. (u, v) are slice pixels: column, row.
    """
    from scipy import ndimage  # deferred: scipy is slow to load

    best = None
    for label, error in ((1, reference & ~predicted), (0, predicted & ~reference)):
        components, count = ndimage.label(error)
        if not count:
            continue
        sizes = np.bincount(components.ravel())[1:]
        region = components == (int(np.argmax(sizes)) + 1)
        if best is None or region.sum() > best[0].sum():
            best = (region, label)
    if best is None:
        return None
    region, label = best
    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]  # the image edge is a border too
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return [float(col), float(row)], label


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def click_rounds(stack: Any, reference: np.ndarray, slices: Sequence[int], rounds: int) -> dict:
    """Box + corrective clicks on ``slices`` of a (k, j, i) boolean ``reference`` through a ``SliceStack``.

    Each slice gets the reference's bounding box; round 0 decodes the box alone, each of ``rounds`` more
    adds one click (``corrective_click``) to the slice's points and decodes box + all points. Returns
    ``{"dice": [mean Dice per round, rounds + 1 values], "per_slice": (slices, rounds + 1) list,
    "worse": share of clicks that lowered their slice's Dice}``.
    """
    if rounds < 0:
        raise InputError("--clicks must be >= 0")
    slices = [int(s) for s in slices if reference[slice_index(stack.axis, s)].any()]
    if not slices:
        raise InputError("the reference has no voxels on the slices to click on")
    truth = np.stack([reference[slice_index(stack.axis, s)] for s in slices])
    boxes = np.array([bounding_box(plane) for plane in truth], dtype=np.float64)
    embeddings, _ = stack.embeddings(slices)
    points: list[list[list[float]]] = [[] for _ in slices]
    labels: list[list[int]] = [[] for _ in slices]
    predicted = stack.masks(embeddings, boxes)
    dice = [[_dice(p, t) for p, t in zip(predicted, truth)]]
    for _ in range(rounds):
        for n, (p, t) in enumerate(zip(predicted, truth)):
            click = corrective_click(p, t)
            if click is None:  # a perfect slice: repeat its last click (or the box's centre) so the batch stays even
                click = (points[n][-1], labels[n][-1]) if points[n] else ([float(boxes[n, 0] + boxes[n, 2]) / 2,
                                                                           float(boxes[n, 1] + boxes[n, 3]) / 2], 1)
            points[n].append(click[0])
            labels[n].append(click[1])
        predicted = stack.masks(embeddings, boxes, np.array(points), np.array(labels))
        dice.append([_dice(p, t) for p, t in zip(predicted, truth)])
    table = np.array(dice)  # (rounds + 1, slices)
    worse = float((np.diff(table, axis=0) < 0).mean()) if rounds else 0.0
    return {"slices": slices, "dice": [float(v) for v in table.mean(axis=1)], "per_slice": table.T.tolist(),
            "worse": worse}
