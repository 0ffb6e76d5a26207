"""Reading a DICOM series folder: the real CT written as a scanner would, and the folders users get wrong."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage, generate_uid

from dicom_fixture import ct_image, write_ct_series
from medsam_server.errors import InputError
from medsam_server.io.dicom import (
    NotAnImageError,
    SeveralSeriesError,
    SliceGeometryError,
    list_series,
    read_dicom_series,
)


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """The whole real CT (34 slices) as one series."""
    return write_ct_series(tmp_path_factory.mktemp("dicom") / "ct")


def test_the_series_reads_as_the_ct_it_was_made_from(ct):
    image, series = read_dicom_series(ct.folder)
    reference = ct_image()
    # Hounsfield units exactly (stored int16 + RescaleIntercept -1024) on the NRRD's own grid.
    import SimpleITK as sitk

    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(reference))
    assert image.GetOrigin() == pytest.approx(reference.GetOrigin(), abs=1e-5)
    assert image.GetSpacing() == pytest.approx(reference.GetSpacing(), abs=1e-5)
    assert image.GetDirection() == pytest.approx(reference.GetDirection(), abs=1e-6)
    # Slice k is the k-th file along the normal although the file names run the other way.
    assert series.sop_instance_uids == ct.sop_instance_uids
    assert series.files == ct.files
    assert series.slices == 34
    assert (series.study_instance_uid, series.series_instance_uid, series.frame_of_reference_uid) == (
        ct.study_instance_uid, ct.series_instance_uid, ct.frame_of_reference_uid)
    assert series.sop_class_uid == pydicom.uid.CTImageStorage and series.modality == "CT"
    assert all("PixelData" not in h for h in series.headers)
    assert series.notes == ()


def test_importing_the_io_modules_loads_neither_highdicom_nor_torch():
    code = ("import sys, medsam_server.io, medsam_server.io.dicom; "
            "print(sorted(m for m in ('highdicom', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_two_series_in_one_folder_are_listed_with_how_to_choose(tmp_path):
    folder = tmp_path / "mixed"
    first = write_ct_series(folder, 0, 9, description="CT chest 10 mm", series_number=3)
    second = write_ct_series(tmp_path / "other", 10, 14, description="CT chest lung kernel", series_number=4)
    for path in second.files:
        shutil.copy(path, folder / f"B{path.name}")
    with pytest.raises(SeveralSeriesError) as err:
        read_dicom_series(folder)
    message = str(err.value)
    assert "holds 2 image series" in message
    assert f"{first.series_instance_uid} #3 'CT chest 10 mm' (CT, CT Image Storage, 10 files)" in message
    assert f"{second.series_instance_uid} #4 'CT chest lung kernel' (CT, CT Image Storage, 5 files)" in message
    assert "--series UID" in message and "a folder that holds only that series" in message
    assert {s.uid for s in err.value.series} == {first.series_instance_uid, second.series_instance_uid}
    # The way out the message names works.
    image, series = read_dicom_series(folder, series_uid=second.series_instance_uid)
    assert image.GetSize() == (128, 128, 5) and series.sop_instance_uids == second.sop_instance_uids
    with pytest.raises(InputError, match=r"holds no series 1\.2\.3; it holds: "):
        read_dicom_series(folder, series_uid="1.2.3")
    assert [s.files for s in list_series(folder)] == [10, 5]


def test_a_missing_slice_is_named(tmp_path):
    write_ct_series(tmp_path / "gap", 0, 9, skip=(4,))
    with pytest.raises(SliceGeometryError, match=r"^1 slice\(s\) missing between IM0007 \(instance 7\) and IM0005 "
                                                 r"\(instance 5\): they are 20\.000 mm apart where the series' slices "
                                                 r"are 10\.000 mm apart \(9 files\)"):
        read_dicom_series(tmp_path / "gap")


def test_unevenly_spaced_slices_are_refused(tmp_path):
    ct = write_ct_series(tmp_path / "uneven", 0, 5)
    moved = pydicom.dcmread(ct.files[2])
    position = [float(v) for v in moved.ImagePositionPatient]
    moved.ImagePositionPatient = [position[0], position[1], position[2] + 3.0]
    moved.save_as(ct.files[2])
    with pytest.raises(SliceGeometryError, match=r"^the slices are unevenly spaced: gaps from 7\.000 to 13\.000 mm "
                                                 r"\(typical 10\.000; first uneven gap between IM0005"):
        read_dicom_series(tmp_path / "uneven")


def test_two_slices_at_one_position_are_refused(tmp_path):
    ct = write_ct_series(tmp_path / "twice", 0, 4)
    copy = pydicom.dcmread(ct.files[1])
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    copy.InstanceNumber = 99
    copy.save_as(tmp_path / "twice" / "IM0099")
    with pytest.raises(SliceGeometryError, match=r"lie at the same position .* the series holds more than one volume"):
        read_dicom_series(tmp_path / "twice")


def _structured_report(folder, study_uid):
    """A Comprehensive SR instance: a DICOM object with no pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID = generate_uid()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID = ComprehensiveSRStorage
    sr.StudyInstanceUID, sr.SeriesInstanceUID = study_uid, generate_uid()
    sr.Modality, sr.SeriesNumber, sr.SeriesDescription = "SR", 900, "Dose report"
    sr.PatientName, sr.PatientID = "Chest^CT4", "CTCHEST4"
    folder.mkdir(parents=True, exist_ok=True)
    sr.save_as(folder / "SR0001", enforce_file_format=True)
    return sr


def test_a_folder_without_an_image_says_what_it_holds(tmp_path):
    sr = _structured_report(tmp_path / "report", generate_uid())
    with pytest.raises(NotAnImageError, match=rf"^folder .*report holds no image series, only "
                                              rf"{sr.SeriesInstanceUID} #900 'Dose report' \(SR, Comprehensive SR "
                                              rf"Storage, 1 files\)$"):
        read_dicom_series(tmp_path / "report")
    with pytest.raises(NotAnImageError, match=r"is Comprehensive SR Storage, not an image to segment"):
        read_dicom_series(tmp_path / "report", series_uid=sr.SeriesInstanceUID)


def test_a_report_beside_the_slices_is_skipped_with_a_note(tmp_path):
    ct = write_ct_series(tmp_path / "ct", 0, 3)
    sr = _structured_report(tmp_path / "ct", ct.study_instance_uid)
    (tmp_path / "ct" / "README.txt").write_text("not DICOM")
    image, series = read_dicom_series(tmp_path / "ct")
    assert image.GetSize() == (128, 128, 4)
    assert series.notes == (f"skipped DICOM objects that are not images: {sr.SeriesInstanceUID} #900 'Dose report' "
                            "(SR, Comprehensive SR Storage, 1 files)", "skipped 1 files that are not DICOM instances")


def test_a_folder_without_dicom_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"holds no DICOM files \(1 other files\)"):
        read_dicom_series(tmp_path)


def test_slices_without_a_position_are_refused(tmp_path):
    ct = write_ct_series(tmp_path / "flat", 0, 2)
    broken = pydicom.dcmread(ct.files[0])
    del broken.ImagePositionPatient
    broken.save_as(ct.files[0])
    with pytest.raises(SliceGeometryError, match=r"IM0003 has no ImagePositionPatient: the slices' position in the "
                                                 r"patient is unknown"):
        read_dicom_series(tmp_path / "flat")


def test_a_single_non_image_file_is_refused_and_an_image_file_passes(tmp_path):
    from medsam_server.io.dicom import refuse_non_image_file

    _structured_report(tmp_path / "one", generate_uid())
    with pytest.raises(NotAnImageError, match=r"^SR0001 is Comprehensive SR Storage, not an image to segment$"):
        refuse_non_image_file(tmp_path / "one" / "SR0001")
    ct = write_ct_series(tmp_path / "ct", 0, 0)
    refuse_non_image_file(ct.files[0])
    (tmp_path / "notes.txt").write_text("hello")
    refuse_non_image_file(tmp_path / "notes.txt")
