"""References for the module's self-test in Slicer: the right lung of a chest CT by thresholding, and keyframes.

Plain numpy and SimpleITK (both ship with Slicer), so the self-test's reference is itself checked headless
(``Testing/Python/test_self_test_reference.py``).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def thresholded_right_lung(array: np.ndarray, ijk_to_world: np.ndarray) -> np.ndarray:
    """The patient's right lung of a chest CT (k, j, i) by thresholding, a test reference: per slice, air
    (< -400 HU) inside the body (> -500 HU, closed and filled) on the right side (RAS x beyond the body's
    middle), the largest 2D component with holes filled. On CTChest4 it matches the expert's right lung
    (Dice 0.98; checked headless in Testing/Python/test_self_test_reference.py)."""
    out = np.zeros(array.shape, dtype=bool)
    nk, nj, ni = array.shape
    jj, ii = np.mgrid[0:nj, 0:ni]
    for k in range(nk):
        plane = array[k]
        # closing first: at low resolution the skin ring has gaps that would let the lungs leak outside
        body = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(
            sitk.GetImageFromArray((plane > -500).astype(np.uint8)), [2, 2])))
        if body.sum() < 100:
            continue
        x = ijk_to_world[0, 0] * ii + ijk_to_world[0, 1] * jj + ijk_to_world[0, 2] * k + ijk_to_world[0, 3]
        middle = 0.5 * (x[body > 0].min() + x[body > 0].max())
        air = (plane < -400) & (body > 0) & (x > middle)
        components = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(
            sitk.GetImageFromArray(air.astype(np.uint8))), minimumObjectSize=30))
        if components.max() == 0:
            continue
        largest = sitk.BinaryFillhole(sitk.GetImageFromArray((components == 1).astype(np.uint8)))
        out[k] = sitk.GetArrayFromImage(largest) > 0
    return out


def keyframe_slices(mask: np.ndarray, count: int) -> list[int]:
    """``count`` slices spread over the longest run of slices where the mask has at least a quarter of its
    largest area (so that stray specks at the ends do not count)."""
    area = mask.reshape(mask.shape[0], -1).sum(axis=1)
    good = area >= 0.25 * area.max()
    runs, start = [], None
    for k, flag in enumerate(list(good) + [False]):
        if flag and start is None:
            start = k
        elif not flag and start is not None:
            runs.append((k - start, start, k - 1))
            start = None
    _, first, last = max(runs)
    return sorted({int(round(v)) for v in np.linspace(first, last, count)})
