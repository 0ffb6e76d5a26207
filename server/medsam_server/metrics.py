"""Segmentation accuracy as in the MedSAM paper: DSC and NSD of masks, and their summaries.

- DSC: volumetric Dice, ``2|A and B| / (|A| + |B|)``.
- NSD: normalized surface Dice at a tolerance tau (2 mm by default, as in MedSAM's
  evaluation): the fraction of both surfaces lying within tau of the other surface,
  computed with DeepMind's ``surface-distance`` package on the voxel grid's real spacing.
- Empty masks: both empty -> DSC 1 and NSD 1 (nothing to find, nothing found);
  exactly one empty -> DSC 0 and NSD 0. ``surface-distance`` itself is never called
  with an empty mask (its empty-mask branch also fails on NumPy 2).

Arrays are numpy ``(k, j, i)`` as SimpleITK's ``GetArrayFromImage`` returns them;
spacings are given in SimpleITK's ``(i, j, k)`` order and reversed here, once.
Files and folders are scored by :mod:`.evaluate`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from .errors import InputError

DEFAULT_TOLERANCE_MM = 2.0


# -- metrics on arrays ---------------------------------------------------------------------------------------------


def dice(ref: np.ndarray, pred: np.ndarray) -> float:
    """Volumetric Dice of two boolean masks of one shape; both empty -> 1.0."""
    ref, pred = _as_masks(ref, pred)
    total = int(ref.sum()) + int(pred.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(ref, pred).sum()) / total


def surface_dice(ref: np.ndarray, pred: np.ndarray, spacing_ijk: Sequence[float],
                 tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> float:
    """Normalized surface Dice (NSD) at ``tolerance_mm``.

    ``ref`` and ``pred`` are boolean masks in numpy order (k, j, i) (or (j, i) for 2D);
    ``spacing_ijk`` is the voxel spacing in mm in SimpleITK's order (i, j, k).
    Both empty -> 1.0; one empty -> 0.0.
    """
    import surface_distance  # deferred: it imports scipy.ndimage, which only NSD needs

    ref, pred = _as_masks(ref, pred)
    if len(spacing_ijk) != ref.ndim:
        raise InputError(f"spacing {tuple(spacing_ijk)} has {len(spacing_ijk)} values for a {ref.ndim}D mask")
    if tolerance_mm < 0:
        raise InputError(f"the NSD tolerance must be >= 0 mm, not {tolerance_mm}")
    ref_any, pred_any = bool(ref.any()), bool(pred.any())
    if not ref_any and not pred_any:
        return 1.0
    if not ref_any or not pred_any:
        return 0.0
    spacing_array_order = tuple(float(s) for s in reversed(tuple(spacing_ijk)))
    with warnings.catch_warnings():
        # surface-distance 0.1 imports from scipy.ndimage's deprecated sub-modules; not ours to fix.
        warnings.simplefilter("ignore", DeprecationWarning)
        distances = surface_distance.compute_surface_distances(ref, pred, spacing_array_order)
    return float(surface_distance.compute_surface_dice_at_tolerance(distances, tolerance_mm))


def case_scores(ref: np.ndarray, pred: np.ndarray, spacing_ijk: Sequence[float],
                tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> dict:
    """``{"dsc": float, "nsd": float}`` for one target of one case (arrays (k, j, i), spacing (i, j, k) mm)."""
    return {"dsc": dice(ref, pred), "nsd": surface_dice(ref, pred, spacing_ijk, tolerance_mm)}


def _as_masks(ref: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, pred = np.asarray(ref).astype(bool, copy=False), np.asarray(pred).astype(bool, copy=False)
    if ref.shape != pred.shape:
        raise InputError(f"masks differ in shape: reference {ref.shape}, prediction {pred.shape}")
    return ref, pred


# -- summaries -----------------------------------------------------------------------------------------------------


def median_iqr(values: Sequence[float]) -> dict:
    """``{"median", "q1", "q3", "n"}`` of ``values`` (linear-interpolated quartiles); None entries when empty."""
    data = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if data.size == 0:
        return {"median": None, "q1": None, "q3": None, "n": 0}
    q1, median, q3 = np.percentile(data, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "n": int(data.size)}


def wilcoxon_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Wilcoxon signed-rank test between paired scores of two methods (two-sided).

    Returns ``{"n", "statistic", "p_value", "note"}``; identical pairs give p = 1 without calling scipy,
    and no pairs give None values with a note.
    """
    from scipy.stats import wilcoxon

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise InputError(f"the two methods have {x.size} and {y.size} scores; the test needs pairs")
    n = int(x.size)
    if n == 0:
        return {"n": 0, "statistic": None, "p_value": None, "note": "no paired scores"}
    if np.all(x == y):
        return {"n": n, "statistic": 0.0, "p_value": 1.0, "note": "all pairs equal"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns on tiny samples; the note says so
        result = wilcoxon(x, y)
    p_value = float(result.pvalue)
    note = "fewer than 6 pairs: p cannot fall below 0.05" if n < 6 else ""
    return {"n": n, "statistic": float(result.statistic), "p_value": None if math.isnan(p_value) else p_value,
            "note": note}

