"""Per-slice confidence of a run, so that a reviewer looks at the least confident slices first.

A slice's confidence is the geometric mean of three numbers in [0, 1], each computed from
what the run already has (no model call):

- *stability*: IoU of the slice's mask at the threshold's logit -1 and +1 (SAM's stability
  score): a mask whose border sits where the probability is flat moves a lot;
- *neighbour agreement*: mean Dice of the slice's final mask with the final masks of the
  slices beside it in the same run (a slice unlike both neighbours is suspect);
- *box fit*: IoU of the final mask's bounding box with the slice's prompt box (a mask that
  does not span its box found something else, or too little; an empty mask scores 0).

Measured on CTChest4 (``medsam simulate``, boxes every 3, 5 and 8 slices; README "Review and
refine"): Spearman against the true per-slice Dice is about +0.85 on the lungs and +0.8 on
the thoracic spine, where the decoder's predicted IoU alone gives +0.85 and +0.45; distance
to the nearest keyframe predicts nothing (about 0). Torch-free: numpy and scipy only.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

from .protocol import MASK_THRESHOLD

#: Half-width, in logits, of the band that stability compares (SAM's stability_score_offset).
STABILITY_LOGIT_OFFSET = 1.0
#: The share of slices whose error ``worst_error_share`` reports (the review list's length).
REVIEW_FRACTION = 0.2


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays; 1.0 when both are empty."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def _shifted(threshold: float, offset: float) -> float:
    """The probability whose logit is ``offset`` away from ``threshold``'s."""
    t = min(max(threshold, 1e-6), 1 - 1e-6)
    return 1.0 / (1.0 + math.exp(-(math.log(t / (1 - t)) + offset)))


def stability(probabilities: np.ndarray, threshold: float = MASK_THRESHOLD) -> float:
    """IoU of ``probabilities`` (rows, cols) in [0, 1] thresholded one logit below and above ``threshold``."""
    low = probabilities > _shifted(threshold, -STABILITY_LOGIT_OFFSET)
    high = probabilities > _shifted(threshold, STABILITY_LOGIT_OFFSET)
    return _iou(low, high)


def box_fit(mask: np.ndarray, box: Sequence[float]) -> float:
    """IoU of a (rows, cols) mask's bounding box with an inclusive [u0, v0, u1, v1] box; 0 for an empty mask."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return 0.0
    u0, v0, u1, v1 = (float(x) for x in box)
    m = (float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max()))
    width = max(0.0, min(m[2], u1) - max(m[0], u0) + 1)
    height = max(0.0, min(m[3], v1) - max(m[1], v0) + 1)
    overlap = width * height
    union = (m[2] - m[0] + 1) * (m[3] - m[1] + 1) + (u1 - u0 + 1) * (v1 - v0 + 1) - overlap
    return overlap / union


def slice_confidence(
    masks: Mapping[int, np.ndarray],
    probabilities: Mapping[int, np.ndarray],
    boxes: Mapping[int, Sequence[float]],
    threshold: float = MASK_THRESHOLD,
) -> dict[int, float]:
    """Confidence in [0, 1] of every slice in ``boxes`` (the slices a segment's run decoded).

    Args:
        masks: slice -> final (rows, cols) bool mask of the segment (after post-processing).
        probabilities: slice -> (rows, cols) probabilities in [0, 1] (float, or uint8 scaled by 255).
        boxes: slice -> the prompt box the slice was decoded with, slice pixels.
        threshold: the probability threshold the masks were made with.
    """
    out = {}
    for index in sorted(boxes):
        probs = np.asarray(probabilities[index])
        if probs.dtype == np.uint8:
            probs = probs / 255.0
        neighbours = [dice(masks[index], masks[j]) for j in (index - 1, index + 1) if j in boxes]
        factors = (stability(probs, threshold), float(np.mean(neighbours)) if neighbours else 1.0,
                   box_fit(masks[index], boxes[index]))
        out[index] = float(np.prod(factors) ** (1.0 / len(factors)))
    return out


def segment_report(confidence: Mapping[int, float], keyframes: Sequence[int]) -> list[dict]:
    """The per-slice entries of ``--report`` and the annotate result, least confident first."""
    keys = set(int(k) for k in keyframes)
    order = sorted(confidence, key=lambda s: (confidence[s], s))
    return [{"slice": int(s), "confidence": round(confidence[s], 4), "keyframe": s in keys} for s in order]


def spearman(confidence: Sequence[float], truth: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation; None when either side is constant (or fewer than 3 slices)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(confidence, dtype=float), np.asarray(truth, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def worst_error_share(confidence: Sequence[float], truth_dice: Sequence[float],
                      fraction: float = REVIEW_FRACTION) -> Optional[float]:
    """Share of the total per-slice error (1 - Dice, summed) in the ``fraction`` least confident slices.

    A ranking by chance gives about ``fraction``; the best possible ranking gives the share of
    the truly worst slices. None when there is no error.
    """
    conf, error = np.asarray(confidence, dtype=float), 1.0 - np.asarray(truth_dice, dtype=float)
    if len(conf) == 0 or error.sum() <= 0:
        return None
    count = max(1, math.ceil(fraction * len(conf)))
    least = np.argsort(conf, kind="stable")[:count]
    return float(error[least].sum() / error.sum())


def review_scores(entries: Sequence[dict], reference: np.ndarray, result: np.ndarray, axis: int) -> dict:
    """How well a segment's review entries rank its slices: Spearman against the true per-slice Dice, and
    the worst-20 % error share. ``reference`` and ``result`` are (k, j, i) bool masks of the segment."""
    from .geometry import slice_index

    confidence = [e["confidence"] for e in entries]
    truth = [dice(reference[slice_index(axis, e["slice"])], result[slice_index(axis, e["slice"])]) for e in entries]
    return {"spearman": spearman(confidence, truth), "worst20_error_share": worst_error_share(confidence, truth)}
