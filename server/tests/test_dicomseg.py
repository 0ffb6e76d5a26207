"""DICOM SEG out and back: the expert's lungs of the real CT written on its DICOM series, read with highdicom."""

from __future__ import annotations

import subprocess
import sys

import highdicom as hd
import numpy as np
import pydicom
import pytest
import slicerio

from dicom_fixture import slicerio_data, write_ct_series
from medsam_server import __version__
from medsam_server.errors import InputError
from medsam_server.io.dicom import NotAnImageError, read_dicom_series
from medsam_server.io.dicomseg import read_seg, segment_code, write_seg

RIGHT_LUNG, LEFT_LUNG = 5, 6  # the expert segmentation's labels
SEGMENTS = [("right lung", 1, (0.9, 0.3, 0.25)), ("left lung", 2, (0.25, 0.55, 0.9))]


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seg")
    written = write_ct_series(folder / "ct")
    _, series = read_dicom_series(written.folder)
    expert = slicerio.read_segmentation(slicerio_data("Segmentation.seg.nrrd"))["voxels"].transpose(2, 1, 0)
    lungs = np.zeros(expert.shape, dtype=np.uint16)
    lungs[expert == RIGHT_LUNG] = 1
    lungs[expert == LEFT_LUNG] = 2
    path = write_seg(folder / "lungs.dcm", lungs, series, SEGMENTS, model="litemedsam")
    return written, series, lungs, path


def test_the_seg_is_a_binary_segmentation_of_the_series(ct):
    written, _, lungs, path = ct
    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    assert seg.StudyInstanceUID == written.study_instance_uid
    assert seg.FrameOfReferenceUID == written.frame_of_reference_uid
    assert seg.SeriesInstanceUID != written.series_instance_uid
    assert (seg.PatientID, seg.Modality) == ("CTCHEST4", "SEG")
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [written.series_instance_uid]
    # Empty frames are left out: one frame per slice that holds the segment.
    assert seg.NumberOfFrames == sum(int(np.any(lungs[k] == n)) for k in range(lungs.shape[0]) for n in (1, 2))


def test_each_segment_carries_its_name_code_colour_and_algorithm(ct):
    seg = hd.seg.segread(ct[3])
    assert seg.segment_numbers == [1, 2]
    for number, side, laterality in ((1, "right lung", "24028007"), (2, "left lung", "7771000")):
        description = seg.get_segment_description(number)
        assert description.segment_label == side
        assert description.segmented_property_category == hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")
        assert description.segmented_property_type == hd.sr.CodedConcept("39607008", "SCT", "Lung")
        modifier = description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
        assert (modifier.CodingSchemeDesignator, modifier.CodeValue) == ("SCT", laterality)
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC
        algorithm = description.algorithm_identification[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("LiteMedSAM", __version__)
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence
    red = seg.get_segment_description(1).RecommendedDisplayCIELabValue
    assert tuple(red) == hd.color.CIELabColor.from_rgb(230, 76, 64).value  # (0.9, 0.3, 0.25) in 8 bits


def test_every_frame_references_a_slice_of_the_series_at_its_position(ct):
    written, series, lungs, path = ct
    seg = hd.seg.segread(path)
    by_uid = {h.SOPInstanceUID: h for h in series.headers}
    slice_of = {uid: k for k, uid in enumerate(written.sop_instance_uids)}
    shared = seg.SharedFunctionalGroupsSequence[0]
    first = series.headers[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == pytest.approx(
        [float(v) for v in first.ImageOrientationPatient])
    measures = shared.PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == pytest.approx([float(v) for v in first.PixelSpacing])
    assert float(measures.SliceThickness) == pytest.approx(float(first.SliceThickness))
    assert (seg.Rows, seg.Columns) == (first.Rows, first.Columns)
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        sources = frame.DerivationImageSequence[0].SourceImageSequence
        assert len(sources) == 1
        uid = sources[0].ReferencedSOPInstanceUID
        assert uid in by_uid
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in position] == pytest.approx([float(v) for v in by_uid[uid].ImagePositionPatient])
        # The frame's pixels are the written mask of that slice and that segment.
        number = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        assert np.array_equal(seg.get_stored_frame(n).astype(bool), lungs[slice_of[uid]] == number)


def test_the_seg_reads_back_on_the_ct_grid_as_the_mask_written(ct):
    _, series, lungs, path = ct
    labels, names = read_seg(path, series)
    assert labels.shape == lungs.shape
    assert np.array_equal(labels, lungs)
    assert names == {1: "right lung", 2: "left lung"}


def test_labels_that_are_not_1_to_n_become_segments_1_to_n(ct, tmp_path):
    _, series, lungs, _ = ct
    relabelled = np.where(lungs == 1, 3, np.where(lungs == 2, 7, 0)).astype(np.uint16)
    path = write_seg(tmp_path / "gapped.dcm", relabelled, series, [("left lung", 7, (0, 0, 1)),
                                                                    ("right lung", 3, (1, 0, 0))])
    labels, names = read_seg(path, series)
    assert names == {1: "right lung", 2: "left lung"}
    assert np.array_equal(labels, lungs)


def test_codes_come_from_the_dictionary_or_from_the_user():
    assert segment_code("Liver").type == ("SCT", "10200004", "Liver")
    tumour = segment_code("tumour")
    assert tumour.category == ("SCT", "49755003", "Morphologically Abnormal Structure")
    assert tumour.type[1] == "108369006"
    given = segment_code("RUL nodule", ["SCT", "27925004", "Nodule"])
    assert given.category == ("SCT", "49755003", "Morphologically Abnormal Structure")
    assert given.type == ("SCT", "27925004", "Nodule") and given.modifier is None
    own = segment_code("graft", {"type": ["SCT", "7970006", "Graft"],
                                 "category": ["SCT", "260787004", "Physical object"]})
    assert own.category[1] == "260787004"
    with pytest.raises(InputError, match=r"^segment 'thing 1': no SNOMED CT segmentation type is known by that name; "
                                         r".*\"code\": \[\"SCT\", \"39607008\", \"Lung\"\]"):
        segment_code("thing 1")
    with pytest.raises(InputError, match=r"code \['SCT', '7970006', 'Graft'\] is not a DICOM segmentation type whose "
                                         r"category is known; add its category"):
        segment_code("graft", ["SCT", "7970006", "Graft"])
    with pytest.raises(InputError, match=r"code must be \[scheme, value, meaning\]"):
        segment_code("graft", ["SCT", "7970006"])


def test_a_user_code_is_written_into_the_seg(ct, tmp_path):
    _, series, lungs, _ = ct
    path = write_seg(tmp_path / "coded.dcm", (lungs == 1).astype(np.uint8), series, [("target A", 1, (1, 0, 0))],
                     model="medsam-vit-b", codes={"target A": ["SCT", "27925004", "Nodule"]})
    description = hd.seg.segread(path).get_segment_description(1)
    assert description.segmented_property_type == hd.sr.CodedConcept("27925004", "SCT", "Nodule")
    assert description.algorithm_identification[0].AlgorithmName == "MedSAM"


def test_bad_writes_and_reads_are_refused(ct, tmp_path):
    written, series, lungs, path = ct
    with pytest.raises(InputError, match=r"labels have shape \(3, 128, 128\) but the DICOM series is "
                                         r"\(k, j, i\) = \(34, 128, 128\)"):
        write_seg(tmp_path / "x.dcm", lungs[:3], series, SEGMENTS)
    with pytest.raises(InputError, match=r"labels \[2\] appear in the label array but in no segment"):
        write_seg(tmp_path / "x.dcm", lungs, series, SEGMENTS[:1])
    assert not (tmp_path / "x.dcm").exists()
    # A CT slice is not a SEG.
    with pytest.raises(InputError, match=r"cannot read IM0001 as a DICOM Segmentation"):
        read_seg(written.files[-1], series)
    # A SEG made on another scan (another frame of reference) does not belong to this series.
    other = write_ct_series(tmp_path / "other", 0, 33)
    _, other_series = read_dicom_series(other.folder)
    with pytest.raises(InputError, match=r"lungs.dcm has Frame of Reference UID .* it was made on another scan"):
        read_seg(path, other_series)
    # Same frame of reference but other instances: named as another series.
    same_frame = write_ct_series(tmp_path / "resent", 0, 33, study_uid=written.study_instance_uid,
                                 frame_of_reference_uid=written.frame_of_reference_uid)
    _, resent = read_dicom_series(same_frame.folder)
    with pytest.raises(InputError, match=r"references none of the 34 instances of series .*: it belongs to another"):
        read_seg(path, resent)


def test_slicer_terminology_table_agrees_with_the_seg_codes_and_needs_only_the_standard_library():
    from medsam_server.io import terminology

    for name, entry in terminology.COMMON_TARGETS.items():
        code = segment_code(name)
        assert entry == (code.category, code.type, code.modifier), name
    assert terminology.terminology_for("Right_Lung") == (
        "Segmentation category and type - DICOM master list~SCT^91723000^Anatomical Structure~SCT^39607008^Lung~"
        "SCT^24028007^Right~Anatomic codes - DICOM master list~^^~^^")
    assert terminology.terminology_for("my thing") is None
    # The Slicer module keeps a copy: the file must load on its own, importing nothing outside the standard library.
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('t', sys.argv[1]); "
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'medsam_server', 'pydicom')))")
    result = subprocess.run([sys.executable, "-c", code, terminology.__file__], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_a_seg_as_the_image_is_refused_and_a_seg_beside_the_slices_is_skipped(ct, tmp_path):
    import shutil

    written, _, _, path = ct
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(path, alone / "lungs.dcm")
    with pytest.raises(NotAnImageError, match=r"holds no image series, only .*\(SEG, Segmentation Storage, 1 files\); "
                                              r"a segmentation is given as --existing"):
        read_dicom_series(alone)
    beside = tmp_path / "beside"
    shutil.copytree(written.folder, beside)
    shutil.copy(path, beside / "lungs.dcm")
    image, series = read_dicom_series(beside)
    assert series.sop_instance_uids == written.sop_instance_uids
    assert series.notes[0].startswith("skipped DICOM objects that are not images: ")


def test_a_seg_file_is_told_from_other_files(ct):
    from medsam_server.io.dicomseg import is_dicom_seg

    written, _, _, path = ct
    assert is_dicom_seg(path)
    assert not is_dicom_seg(written.files[0])
    assert not is_dicom_seg(slicerio_data("Segmentation.seg.nrrd"))


def test_a_series_without_a_frame_of_reference_reads_but_takes_no_seg(tmp_path):
    ct = write_ct_series(tmp_path / "bare", 0, 2)
    for path in ct.files:  # as research tools often write them
        dataset = pydicom.dcmread(path)
        del dataset.FrameOfReferenceUID
        dataset.save_as(path)
    image, series = read_dicom_series(ct.folder)
    assert image.GetSize() == (128, 128, 3)
    assert series.notes == ("the series has no FrameOfReferenceUID, so no DICOM SEG can be made on it",)
    with pytest.raises(InputError, match=r"has no FrameOfReferenceUID, which a DICOM SEG needs to place its frames; "
                                         r"write a .seg.nrrd or a labelmap instead"):
        write_seg(tmp_path / "x.dcm", np.zeros((3, 128, 128), np.uint8), series, SEGMENTS)


def test_without_replace_a_seg_never_overwrites_a_file(ct, tmp_path):
    _, series, lungs, _ = ct
    taken = tmp_path / "taken.dcm"
    taken.write_bytes(b"the user's file")
    with pytest.raises(InputError, match=r"taken.dcm appeared while the labels were computed; it was kept as it is"):
        write_seg(taken, lungs, series, SEGMENTS, replace=False)
    assert taken.read_bytes() == b"the user's file"
    assert [p.name for p in tmp_path.iterdir()] == ["taken.dcm"]
