"""The Slicer self-test's reference (a thresholded right lung) and keyframe choice, checked headless on CTChest4."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import slicerio_data

sitk = pytest.importorskip("SimpleITK")
from MedSAMSlicerLib import reference  # noqa: E402


def test_thresholded_right_lung_matches_the_expert(reference_segmentation):
    image = sitk.ReadImage(slicerio_data("CTChest4.nrrd"))
    ijk_to_ras = np.eye(4)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    ijk_to_ras[:3, :3] = lps_to_ras @ np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    ijk_to_ras[:3, 3] = lps_to_ras @ np.array(image.GetOrigin())
    lung = reference.thresholded_right_lung(sitk.GetArrayFromImage(image), ijk_to_ras)
    labels, names = reference_segmentation
    expert = labels == names["right lung"]
    dice = 2.0 * np.logical_and(lung, expert).sum() / (lung.sum() + expert.sum())
    assert dice >= 0.95, dice

    slices = reference.keyframe_slices(lung, 5)
    assert len(slices) == 5
    assert all(expert[k].sum() > 0.25 * expert.sum(axis=(1, 2)).max() for k in slices)  # real lung, no specks


def test_keyframe_choice_skips_specks():
    mask = np.zeros((20, 8, 8), bool)
    mask[1, 0, 0] = True  # a speck
    mask[5:16, 2:6, 2:6] = True
    assert reference.keyframe_slices(mask, 3) == [5, 10, 15]
