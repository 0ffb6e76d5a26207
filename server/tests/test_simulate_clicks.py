"""``medsam simulate --clicks N``: the simulated corrective-click protocol (issue 14) on real CT slices."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from engine_data import RIGHT_LUNG, slicerio_data
from medsam_server import cli
from medsam_server.errors import InputError
from medsam_server.simulate import corrective_click

SLICES = (20, 21, 22)  # three slices of the right lung keep the encoder cost low


def test_a_click_goes_to_the_largest_error_region_farthest_from_its_border():
    reference = np.zeros((20, 30), bool)
    reference[2:12, 2:22] = True  # 10 x 20
    predicted = reference.copy()
    predicted[2:12, 12:22] = False  # a missed 10 x 10 block: the largest error
    predicted[15:18, 25:28] = True  # a small false positive
    (u, v), label = corrective_click(predicted, reference)
    assert label == 1 and 15 <= u <= 18 and 5 <= v <= 8  # near the missed block's centre (16.5, 6.5)
    predicted = reference.copy()
    predicted[14:20, 0:30] = True  # a false positive strip on the image's edge: its edge is a border too
    (u, v), label = corrective_click(predicted, reference)
    assert label == 0 and v in (16, 17)
    assert corrective_click(reference, reference) is None


def test_simulate_clicks_reports_mean_dice_for_the_box_and_each_round(tmp_path, capsys):
    labels = slicerio.read_segmentation(slicerio_data("Segmentation.seg.nrrd"))["voxels"].transpose(2, 1, 0)
    kept = np.zeros(labels.shape, np.uint8)
    for k in SLICES:
        kept[k] = labels[k] == RIGHT_LUNG
    image = sitk.ReadImage(slicerio_data("CTChest4.nrrd"))
    reference = sitk.GetImageFromArray(kept)
    reference.CopyInformation(image)
    sitk.WriteImage(reference, str(tmp_path / "ref.nrrd"))
    arguments = ["simulate", "--image", slicerio_data("CTChest4.nrrd"), "--ref", str(tmp_path / "ref.nrrd"),
                 "--window", "ct-lung", "--device", "cpu", "--out", str(tmp_path / "report")]
    assert cli.main([*arguments, "--clicks", "2"]) == 0
    out = capsys.readouterr().out
    assert "| target | slices | mean Dice per round" in out
    (row,) = json.loads((tmp_path / "report" / "clicks.json").read_text())
    assert row["slices"] == 3 and row["clicks"] == 2 and len(row["dice"]) == 3  # N + 1 values
    assert all(0.0 <= d <= 1.0 for d in row["dice"]) and row["dice"][0] > 0.7  # the box alone on a lung
    assert 0.0 <= row["worse"] <= 1.0
    assert cli.main([*arguments[:5], "--clicks", "1", "--every", "3"]) == 2  # one protocol at a time


def test_click_rounds_refuses_slices_without_the_target():
    from types import SimpleNamespace

    from medsam_server.simulate import click_rounds

    with pytest.raises(InputError, match="no voxels on the slices"):  # refused before any model call
        click_rounds(SimpleNamespace(axis=2), np.zeros((2, 16, 16), bool), [0, 1], 1)
    with pytest.raises(InputError, match="--clicks must be >= 0"):
        click_rounds(SimpleNamespace(axis=2), np.ones((2, 16, 16), bool), [0, 1], -1)
