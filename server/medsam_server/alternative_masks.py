"""Alternative masks of one slice of a segment's kept run (``refine.SegmentRun``): the decoder's other mask
outputs (SAM's mask tokens 1..3, ``models/alternatives.py``), to cycle through and keep one.

Candidate 0 is the run's own mask of the slice (mask token 0, or the fused views of ``--views``); 1..3 are
the other tokens decoded with the slice's box on its cached embedding (once per slice and box, then kept
in the run). Each candidate's mask is the one the whole run would give with it (the slice's threshold,
holes filled, the largest 3D component kept), so what the client writes equals what a later threshold
request gives. Choosing candidate n puts its probabilities in the run in place of the slice's own (kept
aside): a later threshold moves the chosen mask like any other slice, the review ranks it, and choosing 0
restores the run's own. A re-box of the slice forgets its alternatives (``refine.merge``); a new run
replaces them all. Measured on CTChest4: README "Review and refine".
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .errors import InputError
from .protocol import ALTERNATIVE_COUNT
from .refine import SegmentRun, kept_review, quantize, segment_masks


def check_slice(run: SegmentRun, index: int) -> None:
    """The slice must have been decoded by the run (not locked, not outside the segment)."""
    if index not in run.probabilities:
        decoded = f" (it decoded {min(run.probabilities)}..{max(run.probabilities)})" if run.probabilities else ""
        raise InputError(f"segment {run.name!r}: slice {index} was not decoded in the last run{decoded}; "
                         "it has no alternative masks")


def box_to_decode(run: SegmentRun, index: int) -> Optional[np.ndarray]:
    """The slice's box when its alternatives are not decoded yet, else None."""
    check_slice(run, index)
    return None if index in run.alternatives else run.boxes[index]


def keep_alternatives(run: SegmentRun, index: int, probabilities: np.ndarray) -> None:
    """Keep a slice's decoded alternatives, (3, rows, cols) probabilities, in the run (uint8 as its own)."""
    run.alternatives[index] = quantize(probabilities)


def candidates(run: SegmentRun, index: int) -> np.ndarray:
    """(ALTERNATIVE_COUNT, rows, cols) uint8 probabilities: the run's own, then its alternatives."""
    own = run.original.get(index, run.probabilities[index])
    return np.concatenate([own[None], run.alternatives[index]])


def choose(run: SegmentRun, index: int, candidate: int) -> None:
    """Put candidate ``candidate`` (0 = the run's own) in the run as the slice's probabilities."""
    if not 0 <= candidate < ALTERNATIVE_COUNT:
        raise InputError(f"choose must be 0..{ALTERNATIVE_COUNT - 1}, got {candidate}")
    own = run.original.pop(index, run.probabilities[index])
    run.chosen.pop(index, None)
    run.probabilities[index] = own
    if candidate:
        run.original[index] = own
        run.probabilities[index] = run.alternatives[index][candidate - 1]
        run.chosen[index] = candidate


def alternatives_answer(run: SegmentRun, index: int) -> tuple[dict, np.ndarray]:
    """What the alternatives route sends back: a header (axis, label, slice, chosen, count, threshold, review)
    and the (ALTERNATIVE_COUNT, rows, cols) masks of the slice, one per candidate, as the run would give them."""
    current = run.probabilities[index]
    masks = []
    try:
        for candidate in candidates(run, index):
            run.probabilities[index] = candidate
            masks.append(segment_masks(run)[index])
    finally:
        run.probabilities[index] = current
    header = {"axis": run.axis, "label": run.label, "slice": index, "chosen": run.chosen.get(index, 0),
              "count": ALTERNATIVE_COUNT, "threshold": run.threshold_of(index), "review": kept_review(run)}
    return header, np.array(masks)
