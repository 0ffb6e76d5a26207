"""The Slicer self-test's reference (a thresholded right lung) and keyframe choice, checked headless on CTChest4.

``MedSAMSlicer.py`` imports qt, so its two plain-numpy helpers are taken out of the source and run alone.
"""

from __future__ import annotations

import ast
import os

import numpy as np
import pytest

from conftest import MODULE_DIR, slicerio_data

sitk = pytest.importorskip("SimpleITK")


def _helpers() -> dict:
    with open(os.path.join(MODULE_DIR, "MedSAMSlicer.py")) as handle:
        tree = ast.parse(handle.read())
    wanted = [node for node in tree.body
              if isinstance(node, ast.FunctionDef) and node.name in ("thresholdedRightLung", "keyframeSlicesOf")]
    namespace = {"np": np}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "MedSAMSlicer.py", "exec"), namespace)  # noqa: S102
    return namespace


def test_thresholded_right_lung_matches_the_expert(reference_segmentation):
    helpers = _helpers()
    image = sitk.ReadImage(slicerio_data("CTChest4.nrrd"))
    ijk_to_ras = np.eye(4)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    ijk_to_ras[:3, :3] = lps_to_ras @ np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    ijk_to_ras[:3, 3] = lps_to_ras @ np.array(image.GetOrigin())
    lung = helpers["thresholdedRightLung"](sitk.GetArrayFromImage(image), ijk_to_ras)
    labels, names = reference_segmentation
    expert = labels == names["right lung"]
    dice = 2.0 * np.logical_and(lung, expert).sum() / (lung.sum() + expert.sum())
    assert dice >= 0.95, dice

    slices = helpers["keyframeSlicesOf"](lung, 5)
    assert len(slices) == 5
    assert all(expert[k].sum() > 0.25 * expert.sum(axis=(1, 2)).max() for k in slices)  # real lung, no specks


def test_keyframe_choice_skips_specks():
    helpers = _helpers()
    mask = np.zeros((20, 8, 8), bool)
    mask[1, 0, 0] = True  # a speck
    mask[5:16, 2:6, 2:6] = True
    assert helpers["keyframeSlicesOf"](mask, 3) == [5, 10, 15]
