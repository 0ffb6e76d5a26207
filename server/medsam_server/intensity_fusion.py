"""Intensity fusion (issue 15): the model's per-slice probabilities and the target's own 3D intensities.

The model decides each slice alone and loses about a voxel along the border (thick CT, MR at 2 x 2 x
6 mm). The whole first result knows more: which windowed intensities the target holds and which its
surroundings inside the boxes hold. From the first masks of every decoded slice this stage learns two
histograms -- voxels well inside (the mask eroded by one voxel in-plane) and voxels in the boxes well
outside (beyond the mask dilated by one voxel) -- and adds their log ratio, times ``weight``, to the
model's logit of each voxel inside its slice's box:

    fused logit = logit(model probability) + weight * log(p_inside(intensity) / p_outside(intensity))

Where the target and its surroundings differ in intensity the border follows the intensities; where
they do not, the log ratio is near zero and the model decides. Outside a slice's box nothing changes.
The fused probabilities replace the run's own, so a later threshold moves over them. numpy + scipy;
a few milliseconds a slice.

Measured on CTChest4 and an MR template (README "Accuracy"): weight 4 lifts every target at every
keyframe spacing (the lungs from 0.84 to 0.97 at every 5 slices, the thoracic spine from 0.55 to 0.77).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .refine import SegmentRun, quantize

INTENSITY_WEIGHT = 4.0  # the default: the smallest weight that met every goal of issue 15 (README "Accuracy")
MAX_INTENSITY_WEIGHT = 16.0
BINS = 32  # of the 0..255 windowed intensities: 8 levels a bin, enough voxels per bin on a small target
MIN_VOXELS = 20  # fewer inside (or outside) voxels than this: nothing to learn, the run is left as it is


def box_region(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(rows, cols) bool: the voxels an inclusive [x0, y0, x1, y1] box covers (fractional sides rounded out)."""
    x0, y0, x1, y1 = box
    region = np.zeros(shape, dtype=bool)
    region[max(0, int(np.floor(y0))):int(np.ceil(y1)) + 1, max(0, int(np.floor(x0))):int(np.ceil(x1)) + 1] = True
    return region


def log_ratio(inside: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """(256,) float32: log p_inside / p_outside of each uint8 intensity, from counts per bin (smoothed)."""
    from scipy.ndimage import gaussian_filter1d  # deferred: scipy is slow to load

    def density(counts: np.ndarray) -> np.ndarray:
        smooth = gaussian_filter1d(counts.astype(np.float64) + 1.0, 1.0)  # +1: no empty bin, no infinite ratio
        return smooth / smooth.sum()

    per_bin = np.log(density(inside)) - np.log(density(outside))
    return per_bin[np.arange(256) * BINS // 256].astype(np.float32)


def fuse_intensity(run: SegmentRun, plane: Callable[[int], np.ndarray], weight: float = INTENSITY_WEIGHT) -> bool:
    """Replace ``run``'s decoded probabilities by the fused ones; ``plane(i)`` is slice i's uint8 image
    (rows, cols[, 3]) as the model saw it. False (and the run unchanged) when too few voxels lie inside or
    outside the first masks to learn from."""
    from scipy import ndimage

    if weight <= 0 or not run.probabilities:
        return False
    cross = ndimage.generate_binary_structure(2, 1)
    inside, outside = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    seen = {}
    for index, probabilities in run.probabilities.items():
        image = _grey(plane(index))
        region = box_region(run.boxes[index], image.shape)
        first = probabilities > run.threshold_of(index) * 255.0
        bins = image // (256 // BINS)
        inside += np.bincount(bins[ndimage.binary_erosion(first, cross) & region], minlength=BINS)
        outside += np.bincount(bins[region & ~ndimage.binary_dilation(first, cross)], minlength=BINS)
        seen[index] = (image, region)
    if inside.sum() < MIN_VOXELS or outside.sum() < MIN_VOXELS:
        return False
    evidence = weight * log_ratio(inside, outside)
    for index, (image, region) in seen.items():
        probabilities = run.probabilities[index].copy()  # a new array: the caller's may be shared
        p = np.clip(probabilities[region] / 255.0, 0.5 / 255.0, 1.0 - 0.5 / 255.0)
        fused = np.log(p / (1.0 - p)) + evidence[image[region]]
        probabilities[region] = quantize(1.0 / (1.0 + np.exp(-fused)))
        run.probabilities[index] = probabilities
    return True


def _grey(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else np.round(image.mean(axis=-1)).astype(np.uint8)
