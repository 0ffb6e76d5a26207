"""Intensity fusion (intensity_fusion.py, issue 15): the model's logits plus the target's own intensities.

Synthetic runs check the stage's arithmetic (a one-voxel under-segmentation recovered, nothing changed
outside the boxes or where intensities do not tell inside from outside); the real LiteMedSAM checks it
end to end on an ellipsoid at 3 x 3 x 10 mm and on the real CT (CTChest4) against thresholds a margin
below what was measured (README "Accuracy").
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import SimpleITK as sitk

from engine_data import LEFT_LUNG, RIGHT_LUNG, ct_volume, dice, slicerio_data
from medsam_server.errors import InputError
from medsam_server.intensity_fusion import BINS, INTENSITY_WEIGHT, box_region, fuse_intensity, log_ratio
from medsam_server.multiview import annotate_multiview
from medsam_server.prompts import parse_prompts
from medsam_server.refine import SegmentRun, quantize, segment_masks
from medsam_server.requests import AnnotateOptions, add_option_arguments, options_from_arguments, parse_options
from medsam_server.simulate import simulated_prompts
from test_multiview import ANISOTROPIC, CT_SPACING, THORACIC_SPINE, ellipsoid

MODEL_ONLY = AnnotateOptions(intensity_weight=0.0)


def under_segmented_run(image: np.ndarray, truth: np.ndarray, inside_p: float = 0.9,
                        border_p: float = 0.3) -> SegmentRun:
    """A run over every slice of a (slices, rows, cols) target as a model that misses its one-voxel border
    would give it: ``inside_p`` on the eroded target, ``border_p`` on the border, 0.02 elsewhere."""
    from scipy import ndimage

    n, rows, cols = truth.shape
    run = SegmentRun("t", 1, 2, (rows, cols), n)
    for index in range(n):
        core = ndimage.binary_erosion(truth[index])
        p = np.where(core, inside_p, np.where(truth[index], border_p, 0.02))
        run.probabilities[index] = quantize(p)
        ys, xs = np.nonzero(truth[index])
        run.boxes[index] = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)
    return run


def disc_volume(intensity_inside: float = 200.0, noise: float = 10.0, seed: int = 0):
    """Eight slices of a bright disc (radius 12) in a darker field with noise; uint8 image and bool truth."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:48, :48]
    disc = (yy - 24) ** 2 + (xx - 24) ** 2 <= 12 ** 2
    truth = np.repeat(disc[None], 8, axis=0)
    image = np.where(truth, intensity_inside, 60.0) + rng.normal(0, noise, truth.shape)
    return np.clip(image, 0, 255).astype(np.uint8), truth


def test_log_ratio_favours_the_inside_intensities():
    inside, outside = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    inside[25] = 1000  # bright inside
    outside[7] = 1000  # dark outside
    lut = log_ratio(inside, outside)
    assert lut.shape == (256,) and lut.dtype == np.float32
    assert lut[25 * 8] > 3.0 and lut[7 * 8] < -3.0
    assert abs(lut[15 * 8]) < 0.5  # seen on neither side: no opinion
    np.testing.assert_allclose(log_ratio(inside, inside), 0.0, atol=1e-6)


def test_box_region_is_inclusive_and_rounds_fractional_sides_out():
    region = box_region(np.array([2.0, 3.0, 4.0, 3.0]), (10, 10))  # a box one voxel thin
    assert region.sum() == 3 and region[3, 2:5].all()
    assert box_region(np.array([1.5, 1.5, 2.5, 2.5]), (10, 10)).sum() == 9


def test_fusion_recovers_a_border_the_model_missed():
    image, truth = disc_volume()
    run = under_segmented_run(image, truth)
    before = segment_masks(run)
    assert fuse_intensity(run, lambda i: image[i])
    after = segment_masks(run)
    print(f"\ndisc: Dice {dice(before, truth):.4f} -> {dice(after, truth):.4f}")
    assert dice(before, truth) < 0.93
    assert dice(after, truth) >= 0.99


def test_fusion_leaves_everything_outside_the_boxes_alone():
    image, truth = disc_volume()
    run = under_segmented_run(image, truth)
    run.probabilities[3][:, :10] = 240  # the model's stray mass left of the box (the box starts at column 12)
    outside_before = {i: p[:, :12].copy() for i, p in run.probabilities.items()}
    fuse_intensity(run, lambda i: image[i])
    for index, probabilities in run.probabilities.items():
        np.testing.assert_array_equal(probabilities[:, :12], outside_before[index])


def test_where_intensities_do_not_differ_the_model_decides():
    image, truth = disc_volume(intensity_inside=60.0, noise=10.0)  # the disc is invisible in the image
    run = under_segmented_run(image, truth)
    before = segment_masks(run)
    fuse_intensity(run, lambda i: image[i])
    assert dice(segment_masks(run), before) >= 0.97


def test_too_little_to_learn_from_or_weight_zero_changes_nothing():
    image, truth = disc_volume()
    run = under_segmented_run(image[:1, :6, :6], truth[:1, 20:26, 20:26] | True)
    kept = {i: p.copy() for i, p in run.probabilities.items()}
    assert not fuse_intensity(run, lambda i: image[i, :6, :6])  # the box holds no outside voxel
    assert not fuse_intensity(under_segmented_run(image, truth), lambda i: image[i], weight=0.0)
    for index, probabilities in run.probabilities.items():
        np.testing.assert_array_equal(probabilities, kept[index])


def test_an_rgb_slice_is_fused_on_its_grey_levels():
    image, truth = disc_volume()
    run = under_segmented_run(image, truth)
    assert fuse_intensity(run, lambda i: np.repeat(image[i][..., None], 3, axis=-1))
    assert dice(segment_masks(run), truth) >= 0.99


# ---------------------------------------------------------------- the option


def test_intensity_weight_is_an_option_of_the_cli_and_the_request():
    parser = argparse.ArgumentParser()
    add_option_arguments(parser)
    assert options_from_arguments(parser.parse_args([])).intensity_weight == INTENSITY_WEIGHT
    assert options_from_arguments(parser.parse_args(["--intensity-weight", "0"])) == MODEL_ONLY
    assert parse_options({"intensity_weight": 2}, 34) == AnnotateOptions(intensity_weight=2)
    for bad in (-1.0, 17.0, True, "4"):
        with pytest.raises(InputError, match="intensity_weight must be a number 0..16"):
            AnnotateOptions(intensity_weight=bad)


# ---------------------------------------------------------------- with the real model


@pytest.mark.parametrize("radii", [(36.0, 45.0, 30.0), (40.0, 40.0, 40.0)])  # an ellipsoid, a sphere (3 x 3 x 10 mm)
def test_fusion_on_synthetic_targets_with_the_real_model(litemedsam, shared_cache, radii):
    volume, inside = ellipsoid(radii_mm=radii)
    document = simulated_prompts(inside.astype(np.uint8), [("blob", 1)], 3, window=[0, 255])
    prompts = parse_prompts(document, tuple(reversed(inside.shape)))
    alone = annotate_multiview(volume, np.eye(3), ANISOTROPIC, prompts, litemedsam, shared_cache, MODEL_ONLY)
    fused = annotate_multiview(volume, np.eye(3), ANISOTROPIC, prompts, litemedsam, shared_cache)
    scores = dice(alone.labels == 1, inside), dice(fused.labels == 1, inside)
    print(f"\n{radii}: model alone {scores[0]:.4f}, fused {scores[1]:.4f}")
    assert scores[1] >= max(0.95, scores[0])
    segment = fused.segments[0]
    # The kept run holds the fused probabilities: its masks at the run's threshold are the labels written.
    np.testing.assert_array_equal(segment_masks(segment.run), fused.labels == 1)
    assert segment.voxels == int((fused.labels == 1).sum())


def test_fusion_lifts_the_lungs_and_the_spine_of_the_real_ct(litemedsam, shared_cache):
    """Measured (keyframes every 5 / 10 slices, both lungs in one run): right / left lung 0.836 / 0.845 -> 0.958 /
    0.972 at 5, 0.814 / 0.803 -> 0.921 / 0.943 at 10; thoracic spine alone 0.549 -> 0.768 at 5."""
    volume, labels, direction = ct_volume()
    lungs = [("right lung", RIGHT_LUNG), ("left lung", LEFT_LUNG)]
    for every, floor in ((5, 0.93), (10, 0.90)):
        prompts = parse_prompts(simulated_prompts(labels, lungs, every, window="ct-lung"), (128, 128, 34))
        result = annotate_multiview(volume, direction, CT_SPACING, prompts, litemedsam, shared_cache)
        scores = [dice(result.labels == n, labels == label) for n, (_, label) in enumerate(lungs, start=1)]
        print(f"\nlungs every {every}: {scores}")
        assert min(scores) >= floor
    prompts = parse_prompts(simulated_prompts(labels, [("spine", THORACIC_SPINE)], 5, window="ct-bone"),
                            (128, 128, 34))
    spine = annotate_multiview(volume, direction, CT_SPACING, prompts, litemedsam, shared_cache)
    score = dice(spine.labels == 1, labels == THORACIC_SPINE)
    print(f"thoracic spine every 5: {score:.4f}")
    assert score >= 0.72


def test_a_reoriented_copy_of_the_ct_gives_the_same_fused_voxels(litemedsam, shared_cache, tmp_path):
    """The stage works on the slices as the model saw them: the same physical CT stored in another voxel order
    gives the same voxels."""
    from medsam_server.io.images import read_image

    original = sitk.ReadImage(slicerio_data("CTChest4.nrrd"))[:, :, 12:20]
    copy = sitk.Flip(sitk.PermuteAxes(original, [1, 0, 2]), [True, True, False])  # i' = 127 - j, j' = 127 - i
    sitk.WriteImage(original, str(tmp_path / "a.nrrd"))
    sitk.WriteImage(copy, str(tmp_path / "b.nrrd"))
    a, b = read_image(tmp_path / "a.nrrd"), read_image(tmp_path / "b.nrrd")
    _, labels, _ = ct_volume()
    reference = labels[12:20] == RIGHT_LUNG
    document = simulated_prompts(reference.astype(np.uint8), [("right lung", 1)], 5, window="ct-lung")
    result_a = annotate_multiview(a.array, a.direction, a.spacing, parse_prompts(document, a.size), litemedsam,
                                  shared_cache)
    for entry in document["segments"][0]["boxes"]:
        x0, y0, x1, y1 = entry["box"]
        entry["box"] = [127 - y1, 127 - x1, 127 - y0, 127 - x0]
    result_b = annotate_multiview(b.array, b.direction, b.spacing, parse_prompts(document, b.size), litemedsam,
                                  shared_cache)
    back = np.flip(result_b.labels, axis=(1, 2)).transpose(0, 2, 1)  # (k, j', i') -> (k, j, i)
    assert dice(result_a.labels == 1, reference) >= 0.9
    np.testing.assert_array_equal(back, result_a.labels)


def test_simulate_ablation_reports_each_stage(tmp_path, capsys):
    """``medsam simulate --ablation`` on a small ellipsoid at 3 x 3 x 10 mm: one row per stage and target."""
    from medsam_server import cli
    from medsam_server.simulate import ABLATION

    volume, inside = ellipsoid(shape=(6, 24, 24), radii_mm=(27.0, 30.0, 22.0))
    for name, array in (("image.nrrd", volume), ("ref.nrrd", inside.astype(np.uint8))):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(ANISOTROPIC)
        sitk.WriteImage(image, str(tmp_path / name))
    code = cli.main(["simulate", "--image", str(tmp_path / "image.nrrd"), "--ref", str(tmp_path / "ref.nrrd"),
                     "--every", "2", "--window", "0,255", "--ablation", "--out", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert code == 0 and "| K | target | stage |" in out
    rows = {r["stage"]: r for r in json.loads((tmp_path / "report" / "simulate.json").read_text())}
    assert list(rows) == [name for name, _ in ABLATION]
    for stage, r in rows.items():
        print(f"\n{stage}: {r['dsc']:.4f} / {r['nsd']:.4f} in {r['seconds']} s", end="")
    assert all(r["dsc"] >= 0.8 and r["seconds"] > 0 for r in rows.values())
    assert rows["default"]["dsc"] >= rows["model alone"]["dsc"]
