"""What a run keeps of each segment, so that its threshold can move without a model call.

:class:`SegmentRun` holds a segment's decoded probabilities per slice (uint8, probability x 255:
a quarter of float32; a threshold moves in steps of 1/255), the box each slice was decoded with,
its keyframes and locked slices. :func:`segment_masks` turns it into the segment's masks at
its thresholds (one per segment, optionally one per slice) with the run's post-processing
(holes filled slice by slice, the largest 3D component kept), so ``annotate`` and a later
threshold change give the same masks for the same threshold. The server keeps the last run's
``SegmentRun`` per session and segment label; the CLI takes ``--threshold``.

Measured on CTChest4 (README "Review and refine"): LiteMedSAM under-segments there; a
threshold of 0.3 lifts 3D Dice on every target (thoracic spine 0.549 -> 0.599 with boxes every 5 slices).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .errors import InputError
from .protocol import MASK_THRESHOLD
from .review import segment_report, slice_confidence


def check_threshold(value, where: str = "threshold") -> float:
    """A probability threshold strictly between 0 and 1 (0 or 1 would fill or empty every box)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise InputError(f"{where} must be a number between 0 and 1 (exclusive), got {value!r}")
    return float(value)


def quantize(probabilities: np.ndarray) -> np.ndarray:
    """(…, rows, cols) probabilities in [0, 1] -> uint8 steps of 1/255."""
    return np.round(np.clip(probabilities, 0.0, 1.0) * 255.0).astype(np.uint8)


def above(quantized: np.ndarray, threshold: float) -> np.ndarray:
    """The mask of uint8 probabilities over ``threshold``."""
    return quantized > threshold * 255.0


@dataclass
class SegmentRun:
    """One segment of one run: every decoded slice's probabilities, and how to turn them into masks."""

    name: str
    label: int
    axis: int
    shape: tuple[int, int]  # (rows, cols) of a slice
    n_slices: int
    probabilities: dict[int, np.ndarray] = field(default_factory=dict)  # slice -> (rows, cols) uint8
    boxes: dict[int, np.ndarray] = field(default_factory=dict)  # slice -> (4,) box it was decoded with
    keyframes: list[int] = field(default_factory=list)
    locked: dict[int, np.ndarray] = field(default_factory=dict)  # slice -> bool mask kept as it is
    threshold: float = MASK_THRESHOLD
    slice_thresholds: dict[int, float] = field(default_factory=dict)
    fill_holes: bool = True  # the run's post-processing (AnnotateOptions)
    largest_component: bool = True
    window: Any = None  # the slices' window and orientation (where alternatives.py decodes its slices again)
    orientation: Optional[str] = None
    # Alternative masks (alternatives.py): slice -> (3, rows, cols) uint8 of mask tokens 1..3, the run's own
    # probabilities of a slice on which an alternative was chosen, and which was chosen (0 = the run's own).
    alternatives: dict[int, np.ndarray] = field(default_factory=dict)
    original: dict[int, np.ndarray] = field(default_factory=dict)
    chosen: dict[int, int] = field(default_factory=dict)

    def threshold_of(self, index: int) -> float:
        return self.slice_thresholds.get(index, self.threshold)

    @property
    def covered(self) -> set[int]:
        """Every slice the run decides: decoded and locked."""
        return set(self.probabilities) | set(self.locked)


def postprocess(mask: np.ndarray, slices: set[int], fill_holes: bool, largest_component: bool) -> np.ndarray:
    """Holes filled on ``slices`` of an (n_slices, rows, cols) mask, then its largest 3D component kept."""
    from scipy import ndimage  # here: the request parsers import this module, and scipy is slow to load

    if fill_holes:
        for i in slices:
            mask[i] = ndimage.binary_fill_holes(mask[i])
    if largest_component and mask.any():
        components, count = ndimage.label(mask)
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            mask = components == (1 + int(np.argmax(sizes)))
    return mask


def segment_masks(run: SegmentRun) -> np.ndarray:
    """(n_slices, rows, cols) bool mask of the segment at its thresholds, post-processed as annotate does."""
    mask = np.zeros((run.n_slices, *run.shape), dtype=bool)
    for i, content in run.locked.items():
        mask[i] = content
    for i, probs in run.probabilities.items():
        mask[i] = above(probs, run.threshold_of(i))
    return postprocess(mask, run.covered, run.fill_holes, run.largest_component)


def confidence(run: SegmentRun, mask: np.ndarray) -> dict[int, float]:
    """Per-slice confidence (``review.slice_confidence``) of the decoded slices of ``run`` given its final mask."""
    decoded = sorted(run.probabilities)
    return slice_confidence({i: mask[i] for i in decoded}, run.probabilities,
                            {i: run.boxes[i] for i in decoded}, run.threshold)


def review_entry(run: SegmentRun, mask: np.ndarray) -> dict:
    """One segment of the review report: its slices, least confident first."""
    return {"name": run.name, "label": run.label, "slices": segment_report(confidence(run, mask), run.keyframes)}


def kept_review(run: SegmentRun) -> dict:
    """The review entry of a kept run as it stands (after a re-box or a threshold change)."""
    return review_entry(run, segment_masks(run))


def set_thresholds(run: SegmentRun, threshold: Optional[float], slice_thresholds: Optional[dict]) -> None:
    """Move a run's segment threshold and/or per-slice thresholds (slice -> threshold; None removes one)."""
    if threshold is not None:
        run.threshold = check_threshold(threshold)
    for index, value in (slice_thresholds or {}).items():
        if index not in run.probabilities:
            raise InputError(f"segment {run.name!r}: slice {index} was not decoded in the last run "
                             f"(it decoded {min(run.probabilities)}..{max(run.probabilities)})")
        if value is None:
            run.slice_thresholds.pop(index, None)
        else:
            run.slice_thresholds[index] = check_threshold(value, f"segment {run.name!r}, slice {index}: threshold")


def merge(old: Optional[SegmentRun], new: SegmentRun, only_slice: Optional[int]) -> SegmentRun:
    """The run a session keeps after ``new``: a single-slice re-box updates that slice (now a keyframe) of the
    run before it on the same axis; any other run replaces it."""
    if only_slice is None or old is None or old.axis != new.axis:
        return new
    if only_slice in new.probabilities:  # else the re-boxed slice lies outside this segment: it keeps its run
        old.probabilities[only_slice] = new.probabilities[only_slice]
        old.boxes[only_slice] = new.boxes[only_slice]
        old.slice_thresholds.pop(only_slice, None)
        for kept in (old.alternatives, old.original, old.chosen):  # a new box: its alternatives are others
            kept.pop(only_slice, None)
        old.keyframes = sorted(set(old.keyframes) | {only_slice})
    return old


def threshold_answer(run: SegmentRun) -> tuple[dict, np.ndarray]:
    """What the threshold route sends back: a header (axis, label, slices, thresholds, review) and the
    (N, rows, cols) masks of the run's slices in slice pixels."""
    mask = segment_masks(run)
    slices = sorted(run.covered)
    header = {"axis": run.axis, "label": run.label, "slices": slices, "threshold": run.threshold,
              "slice_thresholds": {str(k): v for k, v in sorted(run.slice_thresholds.items())},
              "review": review_entry(run, mask)}
    return header, mask[slices]
