"""DSC / NSD and `medsam evaluate`: synthetic shapes with known answers, CTChest4's expert lungs, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import surface_distance
from scipy import ndimage

from medsam_server.cli import main
from medsam_server.errors import InputError
from medsam_server.io.labels import read_label_file
from medsam_server.metrics import case_scores, dice, median_iqr, surface_dice, wilcoxon_test

DATA = os.path.join(os.path.dirname(slicerio.__file__), "data")
CT_SEG = os.path.join(DATA, "Segmentation.seg.nrrd")
RIGHT_LUNG, LEFT_LUNG = 5, 6

# The direct surface_distance calls below import from scipy.ndimage's deprecated sub-modules (its code, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")

# Anisotropic voxels (i, j, k) in mm and an array shape (k, j, i): 50 x 60 x 80 mm.
SPACING_IJK = (0.5, 0.75, 2.0)
SHAPE_KJI = (40, 80, 100)
CENTRE_IJK_MM = (25.0, 30.0, 40.0)


def sphere(radius_mm: float, centre_ijk_mm=CENTRE_IJK_MM, shape_kji=SHAPE_KJI, spacing_ijk=SPACING_IJK) -> np.ndarray:
    """Boolean (k, j, i) mask of a ball given in physical mm (origin at voxel 0)."""
    k, j, i = np.indices(shape_kji)
    x, y, z = i * spacing_ijk[0], j * spacing_ijk[1], k * spacing_ijk[2]
    cx, cy, cz = centre_ijk_mm
    return (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= radius_mm**2


def offset_sphere_dice(r: float, d: float) -> float:
    """Dice of two balls of radius r whose centres lie d apart (lens volume over ball volume)."""
    lens = math.pi * (4 * r + d) * (2 * r - d) ** 2 / 12
    return lens / (4 / 3 * math.pi * r**3)


def offset_sphere_nsd(r: float, d: float, tau: float) -> float:
    """Continuous NSD of two balls of radius r, centres d apart: the share of each sphere within tau of the other.

    A point at angle theta from the offset lies sqrt(r^2 + d^2 - 2 r d cos(theta)) from the other centre;
    area is uniform in cos(theta), so the share is the length of the admissible cos(theta) interval over 2.
    """
    low = max(-1.0, (d * d - 2 * r * tau - tau * tau) / (2 * r * d))
    high = min(1.0, (d * d + 2 * r * tau - tau * tau) / (2 * r * d))
    return max(0.0, high - low) / 2


def direct_scores(ref_kji: np.ndarray, pred_kji: np.ndarray, spacing_ijk, tau: float = 2.0) -> tuple[float, float]:
    """DSC and NSD straight from surface_distance, spacing given in the array's (k, j, i) order."""
    distances = surface_distance.compute_surface_distances(ref_kji, pred_kji, tuple(reversed(spacing_ijk)))
    return (float(surface_distance.compute_dice_coefficient(ref_kji, pred_kji)),
            float(surface_distance.compute_surface_dice_at_tolerance(distances, tau)))


def write_labelmap(path: str, labels_kji: np.ndarray, spacing_ijk=SPACING_IJK, like: sitk.Image | None = None) -> str:
    image = sitk.GetImageFromArray(labels_kji.astype(np.uint8))
    if like is not None:
        image.CopyInformation(like)
    else:
        image.SetSpacing(spacing_ijk)
    sitk.WriteImage(image, path, useCompression=True)
    return path


def run_cli(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(["evaluate", *argv])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


# -- metrics on arrays ---------------------------------------------------------------------------------------------


def test_identical_masks_score_one_and_disjoint_masks_zero():
    ball = sphere(10.0)
    assert case_scores(ball, ball, SPACING_IJK) == {"dsc": 1.0, "nsd": 1.0}
    small = sphere(5.0, centre_ijk_mm=(8.0, 8.0, 8.0))  # centres 42 mm apart: the surfaces are 27 mm apart
    assert not (small & ball).any()
    assert case_scores(ball, small, SPACING_IJK) == {"dsc": 0.0, "nsd": 0.0}


def test_empty_mask_conventions():
    empty, ball = np.zeros(SHAPE_KJI, bool), sphere(10.0)
    assert case_scores(empty, empty, SPACING_IJK) == {"dsc": 1.0, "nsd": 1.0}
    assert case_scores(ball, empty, SPACING_IJK) == {"dsc": 0.0, "nsd": 0.0}
    assert case_scores(empty, ball, SPACING_IJK) == {"dsc": 0.0, "nsd": 0.0}


def test_concentric_spheres_with_anisotropic_spacing():
    # Surfaces 0.5 mm apart everywhere: all within tau = 2 mm. 4 mm apart: none.
    inner = sphere(12.0)
    near, far = sphere(12.5), sphere(16.0)
    assert surface_dice(inner, near, SPACING_IJK, 2.0) == pytest.approx(1.0)
    assert surface_dice(inner, far, SPACING_IJK, 2.0) < 0.01
    assert dice(inner, far) == pytest.approx(2 * 12**3 / (12**3 + 16**3), abs=0.01)
    # The spacing order matters: read in the wrong order, 2 mm slices look 0.5 mm thick and the far shell "touches".
    assert surface_dice(inner, far, tuple(reversed(SPACING_IJK)), 2.0) > 0.5


@pytest.mark.parametrize("axis, offset_mm", [(0, 6.0), (2, 4.0), (2, 10.0)])
def test_offset_spheres_match_the_continuous_answer(axis, offset_mm):
    r, tau = 12.0, 2.0
    centre = list(CENTRE_IJK_MM)
    centre[axis] += offset_mm
    ref, pred = sphere(r), sphere(r, centre_ijk_mm=tuple(centre))
    scores = case_scores(ref, pred, SPACING_IJK, tau)
    assert scores["dsc"] == pytest.approx(offset_sphere_dice(r, offset_mm), abs=0.01)
    # surface_distance puts surfels on a one-voxel shell around the boundary, so distances come out short by up to
    # half a voxel: the measured NSD lies between the continuous NSD at tau and at tau + half the coarsest spacing.
    low, high = offset_sphere_nsd(r, offset_mm, tau), offset_sphere_nsd(r, offset_mm, tau + max(SPACING_IJK) / 2)
    assert low - 0.01 <= scores["nsd"] <= high + 0.01
    assert scores["nsd"] == pytest.approx(direct_scores(ref, pred, SPACING_IJK, tau)[1], abs=1e-12)


def test_median_iqr_and_wilcoxon_known_values():
    assert median_iqr([1.0, 2.0, 3.0, 4.0]) == {"median": 2.5, "q1": 1.75, "q3": 3.25, "n": 4}
    assert median_iqr([])["median"] is None
    # Six pairs, all differences one sign: exact two-sided p = 2 / 2**6.
    result = wilcoxon_test([0.9, 0.8, 0.85, 0.7, 0.95, 0.6], [0.8, 0.75, 0.7, 0.65, 0.9, 0.4])
    assert result["p_value"] == pytest.approx(2 / 64)
    assert wilcoxon_test([0.5, 0.6], [0.5, 0.6])["p_value"] == 1.0


# -- medsam evaluate on files --------------------------------------------------------------------------------------


def test_evaluate_spheres_from_nifti_agrees_with_surface_distance(tmp_path, capsys):
    ref = sphere(12.0).astype(np.uint8) * 3
    pred = sphere(12.0, centre_ijk_mm=(25.0, 30.0, 44.0)).astype(np.uint8) * 3
    ref_path = write_labelmap(str(tmp_path / "ball.nii.gz"), ref)
    pred_path = write_labelmap(str(tmp_path / "ball_pred.nii.gz"), pred)
    code, result, _ = run_cli(capsys, "--pred", pred_path, "--ref", ref_path)
    assert code == 0
    [row] = result["cases"]
    expected_dsc, expected_nsd = direct_scores(ref > 0, pred > 0, SPACING_IJK)
    assert (row["case"], row["label"], row["target"]) == ("ball", 3, "label 3")
    assert row["dsc"] == pytest.approx(expected_dsc, abs=1e-12)
    assert row["nsd"] == pytest.approx(expected_nsd, abs=1e-12)
    assert row["dsc"] == pytest.approx(offset_sphere_dice(12.0, 4.0), abs=0.01)
    assert result["targets"][0]["dsc"]["median"] == pytest.approx(expected_dsc)


def ct_reference() -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(CT_SEG)
    return sitk.GetArrayFromImage(image), image


def dilate_lungs(labels_kji: np.ndarray) -> np.ndarray:
    """Each lung grown by one voxel (6-connected) into whatever is not the other lung."""
    out = labels_kji.copy()
    for label in (RIGHT_LUNG, LEFT_LUNG):
        grown = ndimage.binary_dilation(labels_kji == label)
        other = LEFT_LUNG if label == RIGHT_LUNG else RIGHT_LUNG
        out[grown & (labels_kji != other)] = label
    return out


def test_evaluate_ct_chest_lungs_against_dilated_copy(tmp_path, capsys):
    labels, geometry = ct_reference()
    ref_dir, pred_dir, same_dir, out_dir = (tmp_path / n for n in ("ref", "dilated", "same", "out"))
    for folder in (ref_dir, pred_dir, same_dir):
        folder.mkdir()
    shutil.copy(CT_SEG, ref_dir / "chest.seg.nrrd")
    shutil.copy(CT_SEG, same_dir / "chest.seg.nrrd")
    perturbed = dilate_lungs(labels)
    write_labelmap(str(pred_dir / "chest.nrrd"), perturbed, like=geometry)

    code, result, err = run_cli(capsys, "--pred", str(pred_dir), "--ref", str(ref_dir), "--labels", "5", "6",
                                "--compare", str(same_dir), "--out", str(out_dir))
    assert code == 0, err
    spacing_ijk = geometry.GetSpacing()
    rows = {(r["method"], r["label"]): r for r in result["cases"]}
    for label, name in ((RIGHT_LUNG, "right lung"), (LEFT_LUNG, "left lung")):
        dilated = rows[("dilated", label)]
        expected_dsc, expected_nsd = direct_scores(labels == label, perturbed == label, spacing_ijk)
        assert dilated["target"] == name and dilated["case"] == "chest"
        assert dilated["dsc"] == pytest.approx(expected_dsc, abs=1e-12)
        assert dilated["nsd"] == pytest.approx(expected_nsd, abs=1e-12)
        assert 0.5 < dilated["dsc"] < 0.95 and dilated["nsd"] < 0.95  # a 3 mm x 3 mm x 10 mm voxel shell is no detail
        assert (rows[("same", label)]["dsc"], rows[("same", label)]["nsd"]) == (1.0, 1.0)
    tests = {(t["label"], t["metric"]): t for t in result["wilcoxon"]}
    assert set(tests) == {(5, "dsc"), (5, "nsd"), (6, "dsc"), (6, "nsd")} and tests[(5, "dsc")]["n"] == 1
    assert sorted(os.listdir(out_dir)) == ["boxplots.png", "cases.csv", "targets.csv", "wilcoxon.csv"]
    assert (out_dir / "boxplots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "right lung" in (out_dir / "targets.csv").read_text()


def test_wilcoxon_over_six_cases_from_folders(tmp_path, capsys):
    # Method A finds the ball exactly; method B is too large on every case: all paired differences one sign.
    for folder in ("ref", "a", "b"):
        (tmp_path / folder).mkdir()
    for n in range(6):
        centre = (20.0 + n, 30.0, 40.0)
        ball = sphere(8.0 + n, centre_ijk_mm=centre).astype(np.uint8)
        write_labelmap(str(tmp_path / "ref" / f"case{n}.nii.gz"), ball)
        write_labelmap(str(tmp_path / "a" / f"case{n}.nii.gz"), ball)
        write_labelmap(str(tmp_path / "b" / f"case{n}.nrrd"), sphere(10.0 + n, centre_ijk_mm=centre).astype(np.uint8))
    code, result, err = run_cli(capsys, "--pred", str(tmp_path / "a"), "--ref", str(tmp_path / "ref"),
                                "--compare", str(tmp_path / "b"))
    assert code == 0, err
    dsc_test = next(t for t in result["wilcoxon"] if t["metric"] == "dsc")
    assert dsc_test["n"] == 6 and dsc_test["p_value"] == pytest.approx(2 / 64)
    b_summary = next(t for t in result["targets"] if t["method"] == "b")
    assert b_summary["n"] == 6 and b_summary["dsc"]["q1"] <= b_summary["dsc"]["median"] <= b_summary["dsc"]["q3"] < 1


def test_slicer_segmentation_reads_names_and_label_values():
    seg = read_label_file(CT_SEG)
    assert seg.names[RIGHT_LUNG] == "right lung" and seg.size == (128, 128, 34)
    labels, image = ct_reference()
    assert np.array_equal(seg.mask(LEFT_LUNG), labels == LEFT_LUNG)
    assert np.allclose(seg.spacing, image.GetSpacing()) and np.allclose(np.ravel(seg.direction), image.GetDirection())
    assert np.allclose(seg.origin, image.GetOrigin())


# -- bad input -----------------------------------------------------------------------------------------------------


def test_mismatched_geometry_is_refused(tmp_path, capsys):
    ball = sphere(10.0).astype(np.uint8)
    ref = write_labelmap(str(tmp_path / "ref.nii.gz"), ball)
    coarse = write_labelmap(str(tmp_path / "coarse.nii.gz"), ball, spacing_ijk=(0.5, 0.75, 2.5))
    code, _, err = run_cli(capsys, "--pred", coarse, "--ref", ref)
    assert code == 2
    assert "spacing differs" in err and "(0.5, 0.75, 2.5) mm vs (0.5, 0.75, 2) mm" in err
    smaller = write_labelmap(str(tmp_path / "small.nii.gz"), ball[:-1])
    code, _, err = run_cli(capsys, "--pred", smaller, "--ref", ref)
    assert code == 2 and "size differs" in err and "(100, 80, 39) vs (100, 80, 40)" in err


def test_missing_label_is_named(tmp_path, capsys):
    labels, geometry = ct_reference()
    pred = write_labelmap(str(tmp_path / "chest.nrrd"), labels, like=geometry)
    code, _, err = run_cli(capsys, "--pred", pred, "--ref", CT_SEG, "--labels", "5", "9")
    assert code == 2
    assert "label(s) 9 not found in any prediction or reference" in err and "5 (right lung)" in err
    # A label the prediction lacks is a real miss, scored 0 with a warning.
    no_left = np.where(labels == LEFT_LUNG, 0, labels)
    pred = write_labelmap(str(tmp_path / "no_left.nrrd"), no_left, like=geometry)
    code, result, err = run_cli(capsys, "--pred", pred, "--ref", CT_SEG, "--labels", "6")
    assert code == 0 and result["cases"][0]["dsc"] == 0.0 and "has no label 6" in err


@pytest.mark.parametrize("problem", ["file_and_folder", "no_common_names", "not_a_labelmap", "overlapping_layers"])
def test_other_bad_input_exits_2(tmp_path, capsys, problem):
    ball = sphere(10.0).astype(np.uint8)
    ref = write_labelmap(str(tmp_path / "ref.nii.gz"), ball)
    if problem == "file_and_folder":
        argv, message = ["--pred", str(tmp_path), "--ref", ref], "give two files or two folders"
    elif problem == "no_common_names":
        (tmp_path / "p").mkdir()
        (tmp_path / "r").mkdir()
        write_labelmap(str(tmp_path / "p" / "one.nii.gz"), ball)
        write_labelmap(str(tmp_path / "r" / "two.nii.gz"), ball)
        argv, message = ["--pred", str(tmp_path / "p"), "--ref", str(tmp_path / "r")], "no file names match"
    elif problem == "not_a_labelmap":
        image = sitk.GetImageFromArray(ball * 0.5)
        image.SetSpacing(SPACING_IJK)
        sitk.WriteImage(image, str(tmp_path / "prob.nii.gz"))
        argv, message = ["--pred", str(tmp_path / "prob.nii.gz"), "--ref", ref], "holds non-integer values"
    else:
        argv = ["--pred", os.path.join(DATA, "SegmentationOverlapping.seg.nrrd"), "--ref", CT_SEG]
        message = "'ribs' and 'overlapping sphere' share label value 1"
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err


def test_library_raises_input_error_for_shape_mismatch():
    with pytest.raises(InputError, match="differ in shape"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_a_prediction_cropped_to_its_segments_is_scored_on_the_reference_grid(tmp_path, capsys):
    """Slicer writes a .seg.nrrd cropped to its segments; the one reader (io/segnrrd.py) places it back."""
    seg = slicerio.read_segmentation(CT_SEG)
    voxels = np.asarray(seg["voxels"])  # (i, j, k)
    present = np.argwhere(voxels > 0)
    lo, hi = present.min(axis=0), present.max(axis=0) + 1
    seg["voxels"] = np.ascontiguousarray(voxels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    seg["ijkToLPS"] = np.array(seg["ijkToLPS"], dtype=float)
    seg["ijkToLPS"][:3, 3] += seg["ijkToLPS"][:3, :3] @ lo
    cropped = tmp_path / "cropped.seg.nrrd"
    slicerio.write_segmentation(str(cropped), seg)
    assert tuple(seg["voxels"].shape) != (128, 128, 34)  # really a block
    code, result, err = run_cli(capsys, "--pred", str(cropped), "--ref", CT_SEG, "--labels", "5", "6")
    assert code == 0, err
    assert [(row["label"], row["dsc"], row["nsd"]) for row in result["cases"]] == [(5, 1.0, 1.0), (6, 1.0, 1.0)]
