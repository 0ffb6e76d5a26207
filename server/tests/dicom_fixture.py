"""A real CT as a DICOM series: slicerio's CTChest4 written slice by slice as a scanner would.

Each slice is a CT Image Storage instance with the patient, study, series, frame of reference,
equipment, general image, image plane, image pixel and CT image modules filled in: positions
and orientation from the NRRD's geometry, int16 stored values with RescaleIntercept -1024 (so
reading applies the rescale), and file names that do not follow the slice order (so readers
must sort by position). The volume comes from the installed slicerio package folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

INTERCEPT = -1024.0


def slicerio_data(name: str) -> str:
    import slicerio

    return os.path.join(os.path.dirname(slicerio.__file__), "data", name)


@dataclass(frozen=True)
class CtSeries:
    """What was written: the folder, slice k's file and SOP Instance UID, the UIDs, and the HU volume (k, j, i)."""

    folder: Path
    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    hounsfield: np.ndarray
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: np.ndarray


def ct_image(first: int = 0, last: Optional[int] = None) -> sitk.Image:
    image = sitk.ReadImage(slicerio_data("CTChest4.nrrd"))
    last = image.GetSize()[2] - 1 if last is None else last
    return image[:, :, first:last + 1]


def write_ct_series(folder: Path, first: int = 0, last: Optional[int] = None, *, study_uid: Optional[str] = None,
                    frame_of_reference_uid: Optional[str] = None, series_number: int = 3,
                    description: str = "CT chest 10 mm", skip: Sequence[int] = ()) -> CtSeries:
    """Write slices ``first..last`` of CTChest4 into ``folder`` as one CT series; ``skip`` leaves slices out."""
    from pydicom.uid import generate_uid

    image = ct_image(first, last)
    folder.mkdir(parents=True, exist_ok=True)
    hounsfield = sitk.GetArrayFromImage(image)  # (k, j, i) int32
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    origin = np.array(image.GetOrigin())
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    files, uids = [], []
    count = hounsfield.shape[0]
    for k in range(count):
        if k in skip:
            continue
        position = origin + direction[:, 2] * spacing[2] * k
        sop_uid = generate_uid()
        # Names in reverse order of position, as some scanners number them head to feet.
        path = folder / f"IM{count - k:04d}"
        dataset = _slice_dataset(hounsfield[k], position, direction, spacing, instance_number=count - k,
                                 sop_uid=sop_uid, study_uid=study_uid, series_uid=series_uid, frame_uid=frame_uid,
                                 series_number=series_number, description=description)
        dataset.save_as(path, enforce_file_format=True)
        files.append(path)
        uids.append(sop_uid)
    kept = [k for k in range(count) if k not in skip]
    return CtSeries(folder=folder, files=tuple(files), sop_instance_uids=tuple(uids), study_instance_uid=study_uid,
                    series_instance_uid=series_uid, frame_of_reference_uid=frame_uid, hounsfield=hounsfield[kept],
                    origin=tuple(origin), spacing=spacing, direction=direction)


def _slice_dataset(hu: np.ndarray, position, direction, spacing, *, instance_number: int, sop_uid: str,
                   study_uid: str, series_uid: str, frame_uid: str, series_number: int, description: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    # SOP common, patient, general study
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Chest^CT4"
    ds.PatientID = "CTCHEST4"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240102"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "101500"
    ds.AccessionNumber = "A0004"
    ds.ReferringPhysicianName = "Referrer^Test"
    ds.StudyID = "4"
    ds.StudyDescription = "CT chest"
    # general series, frame of reference, general equipment
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "Test Scanner Co"
    ds.ManufacturerModelName = "Fixture CT"
    ds.StationName = "CT01"
    ds.SoftwareVersions = "1.0"
    # general image, image plane
    ds.InstanceNumber = instance_number
    ds.AcquisitionNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientOrientation = ""
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
    ds.PixelSpacing = [f"{spacing[1]:.8f}", f"{spacing[0]:.8f}"]  # (between rows, between columns)
    ds.SliceThickness = f"{spacing[2]:.6f}"
    ds.SliceLocation = f"{position[2]:.6f}"
    # image pixel, CT image
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = f"{INTERCEPT:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.KVP = "120"
    ds.ConvolutionKernel = "B30f"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "200"
    ds.PixelData = (hu - INTERCEPT).astype("<i2").tobytes()
    return ds
