"""The sparse-marker workflow of the paper's Table 15: keyframes -> 3D segmentation.

For each segment, boxes on keyframes (every 3-10 slices) are interpolated to every
slice between the first and last keyframe, each slice is decoded from its cached
embedding in batches, and optionally the mask is propagated past the outermost
keyframes. Locked slices (edited by hand) keep the values of the existing
segmentation and are never decoded.

Box interpolation: the four box corners are interpolated slice by slice with a
monotone cubic (PCHIP) through *all* keyframes of the segment, which follows the
rounded growth and shrinkage of organs better than straight lines between the two
neighbours (``interpolation="linear"``, the baseline); with two keyframes both are
the same line. ``bench/annotate.py`` and the tests compare them.

Propagation (``propagate=N``): up to N slices beyond each outermost keyframe, the box
of a slice is the bounding box of the previous slice's mask grown by
``PROPAGATION_MARGIN_FRACTION`` of its side (at least 1 voxel); it stops at the first
slice whose mask is empty, smaller than ``PROPAGATION_MIN_AREA_FRACTION`` of the
previous slice's mask, or whose mean intensity (after windowing, 0..255) moved more
than ``PROPAGATION_MAX_INTENSITY_SHIFT`` of the range from the keyframe mask's: past the
lung base of CTChest4 the box falls on the liver, which the model segments happily,
but it is bright where the lung was dark.

Post-processing defaults: holes filled slice by slice (a model mask with a hole is
nearly always wrong for a solid target); the largest 3D connected component kept
(one structure per segment, as in the paper's targets). Both can be turned off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from scipy.interpolate import PchipInterpolator

from .embeddings import EmbeddingCache
from .errors import Cancelled, InputError
from .geometry import slice_index
from .prompts import PromptDocument, SegmentPrompt
from .refine import SegmentRun, above, postprocess, quantize, review_entry
from .requests import AnnotateOptions
from .stack import SliceStack

PROPAGATION_MARGIN_FRACTION = 0.1
PROPAGATION_MIN_AREA_FRACTION = 0.2
PROPAGATION_MAX_INTENSITY_SHIFT = 0.2

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class SegmentResult:
    name: str
    label: int
    voxels: int
    slices: list[int]  # slices of the axis this segment's run wrote (locked ones excluded)
    keyframes: int
    propagated: int = 0
    # What the run decoded (the server keeps it to move the threshold) and its per-slice confidence.
    run: Optional[SegmentRun] = field(default=None, repr=False)
    review: dict = field(default_factory=dict, repr=False)


@dataclass
class AnnotationResult:
    labels: np.ndarray  # (k, j, i) uint16, same grid as the input
    segments: list[SegmentResult]
    changed_slices: list[int]  # along the document's axis
    seconds_embedding: float = 0.0
    seconds_decoding: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "segments": [
                {"name": s.name, "label": s.label, "voxels": s.voxels, "slices": len(s.slices),
                 "first_slice": min(s.slices, default=None), "last_slice": max(s.slices, default=None),
                 "keyframes": s.keyframes, "propagated_slices": s.propagated}
                for s in self.segments
            ],
            "seconds": {"embedding": round(self.seconds_embedding, 3), "decoding": round(self.seconds_decoding, 3)},
            "cache": {"hits": self.cache_hits, "misses": self.cache_misses},
            "notes": self.notes,
        }

    def review(self, axis: int) -> dict:
        """The review report (``--report``, the server's annotate result): per segment, least confident first."""
        return {"axis": axis, "segments": [s.review for s in self.segments]}


def interpolate_boxes(segment: SegmentPrompt, method: str = "pchip") -> dict[int, np.ndarray]:
    """Box (4,) in slice pixels for every slice from the first to the last keyframe."""
    slices = np.array([k.slice for k in segment.keyframes])
    boxes = np.array([k.box for k in segment.keyframes], dtype=np.float64)
    every = np.arange(slices[0], slices[-1] + 1)
    if len(slices) == 1:
        return {int(slices[0]): boxes[0]}
    if method == "pchip" and len(slices) > 2:
        corners = PchipInterpolator(slices, boxes, axis=0)(every)
    else:
        corners = np.stack([np.interp(every, slices, boxes[:, c]) for c in range(4)], axis=1)
    return {int(s): c for s, c in zip(every, corners)}


Plan = dict[int, dict[int, np.ndarray]]  # segment label -> slice -> box (4,) in slice pixels


def plan(prompts: PromptDocument, options: AnnotateOptions) -> Plan:
    """The box of every slice each segment's keyframes span (locked slices included).

    With ``options.only_slice`` (re-box one slice), each segment whose keyframes span that slice
    keeps that slice's box alone and the others none.
    """
    boxes = {s.label: interpolate_boxes(s, options.interpolation) for s in prompts.segments}
    only = options.only_slice
    if only is None:
        return boxes
    if not any(only in b for b in boxes.values()):
        raise InputError(f"slice {only} lies outside every segment's keyframes; put a keyframe box on it to re-box it")
    return {label: ({only: b[only]} if only in b else {}) for label, b in boxes.items()}


def slices_to_decode(prompts: PromptDocument, boxes: Plan) -> list[int]:
    """Every slice some segment decodes in the document's window (its planned range less its locked
    slices), sorted; segments with a window of their own see other embeddings."""
    needed: set[int] = set()
    for segment in prompts.segments:
        if segment.window is None or segment.window == prompts.window:
            needed |= set(boxes[segment.label]) - set(segment.locked_slices)
    return sorted(needed)


class _Run:
    """Book-keeping of one annotate call: timings, cache counts, progress, cancel."""

    def __init__(self, stack: SliceStack, progress: Optional[Progress], should_stop, total: int, batch_size: int):
        self.stack, self.progress, self.should_stop = stack, progress, should_stop
        self.total, self.done, self.batch_size = total, 0, batch_size
        self.seconds_embedding = self.seconds_decoding = 0.0
        self.hits = self.misses = 0

    def check(self) -> None:
        if self.should_stop and self.should_stop():
            raise Cancelled("cancelled; nothing was written")

    def probabilities(self, indices: list[int], boxes: list[np.ndarray]) -> np.ndarray:
        """(N, rows, cols) uint8 probabilities (x 255) for boxes on slices, in batches; constant slices give 0."""
        out = np.zeros((len(indices), *self.stack.shape), dtype=np.uint8)
        live = [n for n, i in enumerate(indices) if not self.stack.is_constant(i)]
        for start in range(0, len(live), self.batch_size):
            self.check()
            batch = live[start:start + self.batch_size]
            t0 = time.perf_counter()
            emb, hits = self.stack.embeddings([indices[n] for n in batch], should_stop=self.should_stop)
            t1 = time.perf_counter()
            out[batch] = quantize(self.stack.decode(emb, np.array([boxes[n] for n in batch])))
            t2 = time.perf_counter()
            self.seconds_embedding += t1 - t0
            self.seconds_decoding += t2 - t1
            self.hits += hits
            self.misses += len(batch) - hits
            self.advance(len(batch))
        self.advance(len(indices) - len(live))
        return out

    def advance(self, n: int) -> None:
        if n:
            self.done += n
            if self.progress:
                self.progress("segmenting", min(self.done, self.total), self.total)


def annotate(
    array: np.ndarray,
    direction: np.ndarray,
    prompts: PromptDocument,
    model: Any,
    cache: Optional[EmbeddingCache] = None,
    options: Optional[AnnotateOptions] = None,
    existing: Optional[np.ndarray] = None,
    progress: Optional[Progress] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    digest: Optional[str] = None,
    stack: Optional[SliceStack] = None,
) -> AnnotationResult:
    """Segment every prompt-document segment of a volume.

    Args:
        array: (k, j, i) or (k, j, i, 3) volume, never modified.
        direction: 3x3 LPS direction (columns i, j, k), used to orient slices.
        prompts: a parsed document (``prompts.parse_prompts``) for this volume's size.
        model: a ``PromptableModel`` (or the server's ``WorkerModel``).
        existing: optional (k, j, i) labelmap; the result starts from it, and locked
            slices keep its values.
        stack: the volume already seen as slices through ``model`` (the server keeps one per
            session); built from ``array`` when None.
        progress: ``progress(phase, done, total)``; should_stop: polled between batches.
    Returns: the full labelmap and per-segment statistics. Raises Cancelled before
    anything is returned if stopped: the caller's data is untouched.
    """
    options = options or AnnotateOptions()
    cache = cache if cache is not None else EmbeddingCache()
    spatial = array.shape[:3]
    if existing is not None and existing.shape != spatial:
        raise InputError(f"the existing segmentation has shape {existing.shape}, the image {spatial}")
    if stack is None:
        stack = SliceStack(array, direction, prompts.axis, prompts.window, model, cache, options.orientation, digest)
    labels = np.zeros(spatial, dtype=np.uint16) if existing is None else existing.astype(np.uint16, copy=True)
    plans = plan(prompts, options)
    total = sum(len(set(plans[s.label]) - set(s.locked_slices)) for s in prompts.segments)
    run = _Run(stack, progress, should_stop, total, options.batch_size or model.decoder_batch)
    notes = list(prompts.notes)
    results, changed = [], set()
    stacks = {repr(prompts.window): stack}  # one per window: a segment's own window sees its own slices
    for segment in prompts.segments:
        window = prompts.window_of(segment)
        if repr(window) not in stacks:
            stacks[repr(window)] = SliceStack(array, direction, prompts.axis, window, stack.model, stack.cache,
                                              options.orientation, stack.volume_key)
        stack = run.stack = stacks[repr(window)]
        # Locked slices keep what the labelmap holds; it also joins the 3D post-processing so that
        # a locked slice inside the range does not split the segment in two.
        locked = {i: labels[slice_index(prompts.axis, i)] == segment.label for i in segment.locked_slices}
        mask, written, propagated, kept = _segment_mask(segment, plans[segment.label], stack, run, options, notes,
                                                        locked)
        kept.window, kept.orientation = window, options.orientation  # where its alternatives are decoded
        written -= set(locked)
        _write(labels, mask, segment.label, prompts.axis, written, options.overwrite)
        changed |= written
        voxels = int(sum((labels[slice_index(prompts.axis, i)] == segment.label).sum() for i in written))
        results.append(SegmentResult(segment.name, segment.label, voxels, sorted(written), len(segment.keyframes),
                                     propagated, kept, review_entry(kept, mask)))
        if len(segment.keyframes) == 1 and not options.propagate and stack.n_slices > 1 and options.only_slice is None:
            notes.append(f"segment {segment.name!r} has one keyframe: only slice {segment.keyframes[0].slice} was "
                         "segmented (add keyframes or use --propagate for more)")
    return AnnotationResult(labels, results, sorted(changed), run.seconds_embedding, run.seconds_decoding,
                            run.hits, run.misses, notes)


def _segment_mask(segment: SegmentPrompt, boxes: dict[int, np.ndarray], stack: SliceStack, run: _Run,
                  options: AnnotateOptions, notes: list[str],
                  locked: dict[int, np.ndarray]) -> tuple[np.ndarray, set[int], int, SegmentRun]:
    """(n_slices, rows, cols) bool mask of one segment, the slices it covers, how many were propagated, and
    what the run decoded (probabilities and boxes per slice)."""
    kept = SegmentRun(segment.name, segment.label, stack.axis, stack.shape, stack.n_slices,
                      keyframes=[k.slice for k in segment.keyframes], locked=locked, threshold=options.threshold,
                      fill_holes=options.fill_holes, largest_component=options.largest_component)
    mask = np.zeros((stack.n_slices, *stack.shape), dtype=bool)
    for i, content in locked.items():
        mask[i] = content
    indices = [i for i in sorted(boxes) if i not in locked]
    for i, probabilities in zip(indices, run.probabilities(indices, [boxes[i] for i in indices])):
        kept.probabilities[i], kept.boxes[i] = probabilities, boxes[i]
        mask[i] = above(probabilities, options.threshold)
    for i in indices:
        if stack.is_constant(i):
            notes.append(f"segment {segment.name!r}, slice {i}: the slice is constant, left empty")
    covered = set(boxes)
    propagated = 0
    if options.propagate:
        first, last = min(boxes), max(boxes)
        for step, start in ((-1, first), (1, last)):
            for index in _propagate(mask, start, step, options.propagate, stack, run, kept):
                covered.add(index)
                propagated += 1
    return postprocess(mask, covered, options.fill_holes, options.largest_component), covered, propagated, kept


def _propagate(mask: np.ndarray, start: int, step: int, limit: int, stack: SliceStack, run: _Run,
               kept: SegmentRun) -> list[int]:
    """Grow the mask slice by slice from ``start`` (exclusive) in direction ``step``; return the slices written."""
    written: list[int] = []
    previous = start
    if not mask[start].any():
        return written
    reference_intensity = stack.mean_intensity(start, mask[start])
    for index in range(start + step, start + step * (limit + 1), step):
        if not 0 <= index < stack.n_slices or index in kept.locked or stack.is_constant(index):
            break
        rows, cols = np.nonzero(mask[previous])
        if rows.size == 0:
            break
        box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float64)
        grow = np.maximum(1.0, PROPAGATION_MARGIN_FRACTION * (box[2:] - box[:2]))
        box = np.clip(box + np.concatenate([-grow, grow]), 0, [stack.shape[1] - 1, stack.shape[0] - 1] * 2)
        run.total += 1
        probabilities = run.probabilities([index], [box])[0]
        candidate = above(probabilities, kept.threshold)
        if candidate.sum() < PROPAGATION_MIN_AREA_FRACTION * rows.size:
            break
        if abs(stack.mean_intensity(index, candidate) - reference_intensity) > 255 * PROPAGATION_MAX_INTENSITY_SHIFT:
            break
        mask[index] = candidate
        kept.probabilities[index], kept.boxes[index] = probabilities, box
        written.append(index)
        previous = index
    return written


def _write(labels: np.ndarray, mask: np.ndarray, label: int, axis: int, slices: set[int], overwrite: bool) -> None:
    """Replace ``label`` on ``slices`` by ``mask``; other labels are kept unless ``overwrite``."""
    for index in slices:
        target = labels[slice_index(axis, index)]
        new = mask[index]
        target[target == label] = 0
        free = new if overwrite else new & (target == 0)
        target[free] = label
