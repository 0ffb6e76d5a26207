"""``medsam annotate SERIES_FOLDER --output result.dcm`` on the real CT as a DICOM series, real LiteMedSAM weights.

Three keyframes on three neighbouring slices of the right lung keep the encoder cost to a few seconds a run.
"""

from __future__ import annotations

import json

import highdicom as hd
import numpy as np
import pytest
import slicerio

from dicom_fixture import slicerio_data, write_ct_series
from medsam_server import cli
from medsam_server.io.dicom import read_dicom_series
from medsam_server.io.dicomseg import read_seg

RIGHT_LUNG, LEFT_LUNG = 5, 6  # the expert segmentation's labels
SLICES = (14, 15, 16)


def _boxes(expert: np.ndarray, label: int) -> list[dict]:
    boxes = []
    for k in SLICES:
        rows, cols = np.nonzero(expert[k] == label)
        boxes.append({"slice": k, "box": [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]})
    return boxes


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The whole CT as a DICOM series, the expert labels (k, j, i), and prompt documents for each lung."""
    folder = tmp_path_factory.mktemp("cli_dicom")
    ct = write_ct_series(folder / "series")
    expert = slicerio.read_segmentation(slicerio_data("Segmentation.seg.nrrd"))["voxels"].transpose(2, 1, 0)
    right = {"axis": 2, "window": "ct-lung", "segments": [{"name": "right lung", "boxes": _boxes(expert, RIGHT_LUNG)}]}
    left = {"axis": 2, "window": "ct-lung",
            "segments": [{"name": "left lung", "label": 2, "boxes": _boxes(expert, LEFT_LUNG)}]}
    (folder / "right.json").write_text(json.dumps(right))
    (folder / "left.json").write_text(json.dumps(left))
    return folder, ct, expert


def annotate(*args) -> int:
    return cli.main(["annotate", *map(str, args)])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def runs(case):
    """Three runs on the series: the right lung to a SEG and to a .seg.nrrd, then the left lung on the first SEG."""
    folder, ct, _ = case
    paths = {"seg": folder / "result.dcm", "nrrd": folder / "result.seg.nrrd", "both": folder / "both.dcm"}
    assert annotate(ct.folder, "--prompts", folder / "right.json", "--output", paths["seg"]) == 0
    assert annotate(ct.folder, "--prompts", folder / "right.json", "--output", paths["nrrd"]) == 0
    assert annotate(ct.folder, "--prompts", folder / "left.json", "--existing", paths["seg"],
                    "--output", paths["both"]) == 0
    return paths


def test_a_series_folder_gives_a_seg_equal_to_the_seg_nrrd_of_the_same_run(case, runs):
    folder, ct, expert = case
    _, series = read_dicom_series(ct.folder)
    from_seg, names = read_seg(runs["seg"], series)
    from medsam_server.io.images import read_image
    from medsam_server.io.labels import read_labels

    from_nrrd, _ = read_labels(runs["nrrd"], read_image(ct.folder))
    assert names == {1: "right lung"}
    assert np.array_equal(from_seg, from_nrrd)
    assert set(np.flatnonzero(from_seg.any(axis=(1, 2)))) == set(SLICES)
    assert dice(from_seg[list(SLICES)] == 1, expert[list(SLICES)] == RIGHT_LUNG) >= 0.85

    seg = hd.seg.segread(runs["seg"])
    assert seg.StudyInstanceUID == ct.study_instance_uid and seg.FrameOfReferenceUID == ct.frame_of_reference_uid
    referenced = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                  for f in seg.PerFrameFunctionalGroupsSequence}
    assert referenced == {ct.sop_instance_uids[k] for k in SLICES}
    description = seg.get_segment_description(1)
    assert description.segmented_property_type == hd.sr.CodedConcept("39607008", "SCT", "Lung")
    assert description.algorithm_identification[0].AlgorithmName == "LiteMedSAM"


def test_an_existing_seg_is_kept_and_the_new_segment_added(case, runs):
    _, ct, expert = case
    _, series = read_dicom_series(ct.folder)
    before, _ = read_seg(runs["seg"], series)
    after, names = read_seg(runs["both"], series)
    assert names == {1: "right lung", 2: "left lung"}
    assert np.array_equal(after == 1, before == 1)
    assert dice(after[list(SLICES)] == 2, expert[list(SLICES)] == LEFT_LUNG) >= 0.85


@pytest.fixture
def no_model(monkeypatch):
    """The model must not load: these errors are found before it (the run would take minutes on a full CT)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad argument was found")

    monkeypatch.setattr("medsam_server.models.load_model", refuse)


def annotate_error(capsys, *args) -> str:
    assert annotate(*args) == 2
    return capsys.readouterr().err


def test_a_seg_output_needs_a_dicom_series_and_is_refused_before_the_model_loads(case, capsys, tmp_path, no_model):
    import SimpleITK as sitk

    folder, ct, _ = case
    nrrd = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.ReadImage(slicerio_data("CTChest4.nrrd")), str(nrrd))
    prompts = folder / "right.json"
    err = annotate_error(capsys, nrrd, "--prompts", prompts, "--output", tmp_path / "out.dcm")
    assert "a DICOM SEG output (out.dcm) is made on a DICOM series: give the series' folder as IMAGE" in err
    (tmp_path / "old.dcm").write_bytes(b"")
    err = annotate_error(capsys, nrrd, "--prompts", prompts, "--output", tmp_path / "out.nrrd",
                         "--existing", tmp_path / "old.dcm")
    assert "a DICOM SEG given as --existing (old.dcm) belongs to a DICOM series" in err
    err = annotate_error(capsys, ct.folder, "--prompts", prompts, "--output", tmp_path / "out.txt")
    assert "cannot write labels to out.txt: the output must end in .seg.nrrd" in err
    unnamed = tmp_path / "unnamed.json"
    unnamed.write_text(prompts.read_text().replace("right lung", "blob"))
    err = annotate_error(capsys, ct.folder, "--prompts", unnamed, "--output", tmp_path / "out.dcm")
    assert "segment 'blob': no SNOMED CT segmentation type is known by that name" in err
    assert not any(tmp_path.glob("out.*"))


def test_a_folder_with_two_series_says_how_to_choose_before_the_model_loads(case, capsys, tmp_path, no_model):
    import shutil

    folder, ct, _ = case
    mixed = tmp_path / "mixed"
    shutil.copytree(ct.folder, mixed)
    other = write_ct_series(tmp_path / "other", 0, 4, description="scout")
    for path in other.files:
        shutil.copy(path, mixed / f"B{path.name}")
    prompts = folder / "right.json"
    err = annotate_error(capsys, mixed, "--prompts", prompts, "--output", tmp_path / "out.dcm")
    assert "holds 2 image series" in err and "--series UID" in err and other.series_instance_uid in err
    err = annotate_error(capsys, mixed, "--series", "1.2.3", "--prompts", prompts, "--output", tmp_path / "out.dcm")
    assert "holds no series 1.2.3" in err
