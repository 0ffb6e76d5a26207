"""A folder of DICOM files -> one image series as a SimpleITK image, and what a SEG must reference.

The volume's slice k is the k-th instance in order along the slice normal (the cross product
of ImageOrientationPatient's row and column cosines), so its axes are (i = along a row,
j = down a column, k = the normal), in LPS millimetres, as SimpleITK reads DICOM.
:class:`DicomSeries` keeps each slice's SOP Instance UID and the study, series and frame of
reference UIDs so that a DICOM Segmentation (``io.dicomseg``) can reference the source
frame by frame.

Everything a user can get wrong is an :class:`~medsam_server.errors.InputError` subclass with a
message that names the files and says what to do: several series in one folder
(:class:`SeveralSeriesError`, with the list), a folder with no image (:class:`NotAnImageError`),
slices missing, repeated, unevenly spaced or not stacked along their normal
(:class:`SliceGeometryError`).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

PathLike = Union[str, "os.PathLike[str]"]

#: Slice positions and cosines agree within this many mm (positions are decimal strings of at most 16 characters).
POSITION_TOLERANCE_MM = 0.01
#: A gap between neighbouring slices may differ from the typical one by this fraction before it is "uneven".
SPACING_TOLERANCE = 0.01
COSINE_TOLERANCE = 1e-4
#: Segmentation Storage and Label Map Segmentation Storage: they carry pixels, but they are not an image to segment.
SEGMENTATION_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class SeveralSeriesError(InputError):
    """The folder holds more than one image series; ``series`` lists them so a caller can offer the choice."""

    def __init__(self, message: str, series: list[SeriesSummary]):
        super().__init__(message)
        self.series = series


class NotAnImageError(InputError):
    """The chosen DICOM objects have no image to segment (an SR, a SEG, an RT structure set, ...)."""


class SliceGeometryError(InputError):
    """The slices do not form one evenly spaced stack: missing, repeated, uneven or shifted slices."""


@dataclass(frozen=True)
class SeriesSummary:
    """One series found in a folder, as the "which series?" message lists it."""

    uid: str
    description: str
    modality: str
    number: Optional[int]
    files: int
    kind: str  # the SOP class name, e.g. "CT Image Storage", "Segmentation Storage"
    is_image: bool

    def describe(self) -> str:
        number = f" #{self.number}" if self.number is not None else ""
        description = f" '{self.description}'" if self.description else ""
        return f"{self.uid}{number}{description} ({self.modality or '?'}, {self.kind}, {self.files} files)"


@dataclass(frozen=True)
class DicomSeries:
    """Where a volume read from DICOM came from; slice k of the volume is ``files[k]``.

    ``headers`` are the instances' data sets without pixel data, in slice order: what a DICOM
    Segmentation needs from its source images (patient, study, geometry, UIDs).
    """

    folder: Path
    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    description: str
    headers: tuple = field(repr=False, compare=False)
    notes: tuple[str, ...] = ()

    @property
    def slices(self) -> int:
        return len(self.files)


@dataclass
class _Instance:
    path: Path
    header: object  # pydicom.Dataset without pixel data
    has_pixels: bool


def _read_headers(folder: Path) -> tuple[list[_Instance], int]:
    """Every DICOM file directly in ``folder`` (not sub-folders); returns them and how many files were not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    instances: list[_Instance] = []
    skipped = 0
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            # Large values (the pixels) are left on disk: only their presence matters here.
            header = pydicom.dcmread(path, defer_size=1024)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            skipped += 1
            continue
        if "SeriesInstanceUID" not in header:  # a DICOMDIR or other non-instance file
            skipped += 1
            continue
        has_pixels = False
        for keyword in _PIXEL_KEYWORDS:
            if keyword in header:
                has_pixels = True
                delattr(header, keyword)
        instances.append(_Instance(path, header, has_pixels))
    return instances, skipped


def _summary(uid: str, instances: list[_Instance]) -> SeriesSummary:
    first = instances[0].header
    sop_class = first.get("SOPClassUID", "")
    kind = getattr(sop_class, "name", "") or str(sop_class) or "unknown SOP class"
    number = first.get("SeriesNumber")
    is_image = all(i.has_pixels for i in instances) and str(sop_class) not in SEGMENTATION_SOP_CLASSES
    return SeriesSummary(uid=uid, description=str(first.get("SeriesDescription", "")).strip(),
                         modality=str(first.get("Modality", "")), number=int(number) if number is not None else None,
                         files=len(instances), kind=kind, is_image=is_image)


def _group(folder: Path) -> tuple[dict[str, list[_Instance]], list[SeriesSummary], int]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of DICOM files")
    instances, skipped = _read_headers(folder)
    if not instances:
        raise InputError(f"folder {folder} holds no DICOM files ({skipped} other files); "
                         "give an image file or a folder holding one DICOM series")
    by_series: dict[str, list[_Instance]] = defaultdict(list)
    for instance in instances:
        by_series[str(instance.header.SeriesInstanceUID)].append(instance)
    summaries = [_summary(uid, group) for uid, group in by_series.items()]
    return by_series, summaries, skipped


def list_series(folder: PathLike) -> list[SeriesSummary]:
    """The series among the files directly in ``folder``, image series first."""
    _, summaries, _ = _group(Path(folder))
    return sorted(summaries, key=lambda s: (not s.is_image, s.number if s.number is not None else 0, s.uid))


def _choose(folder: Path, summaries: list[SeriesSummary], series_uid: Optional[str]) -> SeriesSummary:
    if series_uid is not None:
        for summary in summaries:
            if summary.uid == series_uid:
                if not summary.is_image:
                    raise NotAnImageError(f"series {series_uid} in {folder} is {summary.kind}, not an image to "
                                          "segment" + _seg_hint(summary))
                return summary
        listing = "; ".join(s.describe() for s in summaries)
        raise InputError(f"folder {folder} holds no series {series_uid}; it holds: {listing}")
    images = [s for s in summaries if s.is_image]
    if not images:
        listing = "; ".join(s.describe() for s in summaries)
        raise NotAnImageError(f"folder {folder} holds no image series, only {listing}"
                              + "".join(_seg_hint(s) for s in summaries[:1]))
    if len(images) > 1:
        listing = "; ".join(s.describe() for s in images)
        raise SeveralSeriesError(
            f"folder {folder} holds {len(images)} image series: {listing}. Choose one with --series UID "
            "(one of the UIDs above) or give a folder that holds only that series", images)
    return images[0]


def _seg_hint(summary: SeriesSummary) -> str:
    if summary.kind.endswith("Segmentation Storage"):
        return "; a segmentation is given as --existing, with the image series it belongs to"
    return ""


def _vector(header, keyword: str, length: int, path: Path) -> np.ndarray:
    value = header.get(keyword)
    if value is None or len(value) != length:
        raise SliceGeometryError(f"{path.name} has no {keyword}: the slices' position in the patient is unknown, "
                                 "so they cannot be stacked into a volume")
    return np.array([float(v) for v in value], dtype=np.float64)


def _geometry(instances: list[_Instance]) -> tuple[list[_Instance], np.ndarray, tuple[float, float, float]]:
    """Sort the slices along their normal and check they form one even stack.

    Returns the instances in slice order, the 3x3 direction (columns: row cosine, column cosine,
    normal) and the spacing (i, j, k) in mm.
    """
    first = instances[0]
    for instance in instances:
        frames = int(instance.header.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise SliceGeometryError(f"{instance.path.name} is a multi-frame image ({frames} frames); this reader "
                                     "takes a series of single-frame slices (convert it, e.g. with Slicer's DICOM "
                                     "module, to NRRD first)")
    orientation = _vector(first.header, "ImageOrientationPatient", 6, first.path)
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    pixel_spacing = _vector(first.header, "PixelSpacing", 2, first.path)
    size = (int(first.header.get("Rows", 0)), int(first.header.get("Columns", 0)))
    for instance in instances[1:]:
        name = instance.path.name
        if not np.allclose(_vector(instance.header, "ImageOrientationPatient", 6, instance.path), orientation,
                           atol=COSINE_TOLERANCE):
            raise SliceGeometryError(f"{name} and {first.path.name} have different ImageOrientationPatient: the "
                                     "series mixes slice orientations")
        if (int(instance.header.get("Rows", 0)), int(instance.header.get("Columns", 0))) != size:
            raise SliceGeometryError(f"{name} and {first.path.name} have different Rows/Columns")
        if not np.allclose(_vector(instance.header, "PixelSpacing", 2, instance.path), pixel_spacing,
                           atol=POSITION_TOLERANCE_MM * 0.1):
            raise SliceGeometryError(f"{name} and {first.path.name} have different PixelSpacing")
    positions = np.array([_vector(i.header, "ImagePositionPatient", 3, i.path) for i in instances])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    instances = [instances[n] for n in order]
    positions, along = positions[order], along[order]
    # DICOM PixelSpacing is (between rows, between columns) = (j, i).
    spacing_ij = (float(pixel_spacing[1]), float(pixel_spacing[0]))
    if len(instances) == 1:
        thickness = first.header.get("SpacingBetweenSlices") or first.header.get("SliceThickness") or 1.0
        return instances, np.column_stack([row, column, normal]), (*spacing_ij, float(thickness))
    _check_stack(instances, positions, along, normal)
    gap = float(np.median(np.diff(along)))
    return instances, np.column_stack([row, column, normal]), (*spacing_ij, gap)


def _instance_name(instance: _Instance) -> str:
    number = instance.header.get("InstanceNumber")
    return f"{instance.path.name}" + (f" (instance {number})" if number is not None else "")


def _check_stack(instances: list[_Instance], positions: np.ndarray, along: np.ndarray, normal: np.ndarray) -> None:
    """Raise SliceGeometryError for repeated, missing or unevenly spaced slices, or a stack not along its normal."""
    gaps = np.diff(along)
    for n in np.flatnonzero(gaps < POSITION_TOLERANCE_MM):
        raise SliceGeometryError(
            f"{_instance_name(instances[n])} and {_instance_name(instances[n + 1])} lie at the same position "
            f"{along[n]:.3f} mm: the series holds more than one volume (echoes, phases or time points?); "
            "put one volume's files in a folder of their own")
    offsets = positions - positions[0] - np.outer(along - along[0], normal)
    shift = float(np.max(np.linalg.norm(offsets, axis=1)))
    if shift > POSITION_TOLERANCE_MM * 10:
        raise SliceGeometryError(f"the slices shift {shift:.2f} mm sideways along the stack (a tilted gantry?), so "
                                 "they do not form a box of voxels; resample the series first")
    typical = float(np.median(gaps))
    tolerance = max(POSITION_TOLERANCE_MM, SPACING_TOLERANCE * typical)
    uneven = np.flatnonzero(np.abs(gaps - typical) > tolerance)
    if not len(uneven):
        return
    n = int(uneven[0])
    pair = f"{_instance_name(instances[n])} and {_instance_name(instances[n + 1])}"
    ratio = gaps[n] / typical
    if ratio > 1.5 and abs(ratio - round(ratio)) * typical <= tolerance:
        missing = int(round(ratio)) - 1
        raise SliceGeometryError(
            f"{missing} slice(s) missing between {pair}: they are {gaps[n]:.3f} mm apart where the series' slices "
            f"are {typical:.3f} mm apart ({len(instances)} files); copy the whole series")
    raise SliceGeometryError(
        f"the slices are unevenly spaced: gaps from {gaps.min():.3f} to {gaps.max():.3f} mm (typical {typical:.3f}; "
        f"first uneven gap between {pair}); a volume needs evenly spaced slices, so resample the series first")


def _read_pixels(files: list[Path], direction: np.ndarray, spacing, origin) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    try:
        image = reader.Execute()
    except RuntimeError as err:
        text = " ".join(str(err).split("ERROR:", 1)[-1].split())[:300]
        raise InputError(f"cannot read the pixels of the DICOM series in {files[0].parent}: {text}") from None
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetSize()[2] != len(files):
        raise InputError(f"SimpleITK read {image.GetSize()[2]} slices from {len(files)} files in {files[0].parent}")
    # The geometry checked above, not the reader's own guess from the first and last file.
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def read_dicom_series(folder: PathLike, series_uid: Optional[str] = None) -> tuple[sitk.Image, DicomSeries]:
    """Read the one image series in ``folder`` (or the series ``series_uid``) into a 3D SimpleITK image.

    The image holds modality values (RescaleSlope/Intercept applied: Hounsfield units for CT);
    slice k is ``DicomSeries.files[k]``. Files that are not DICOM are skipped; objects of other
    series that are not images (a SEG or SR saved beside the slices) are skipped with a note.
    Raises SeveralSeriesError, NotAnImageError, SliceGeometryError or InputError, each naming the
    files and what to do.
    """
    folder = Path(folder)
    by_series, summaries, skipped = _group(folder)
    chosen = _choose(folder, summaries, series_uid)
    instances, direction, spacing = _geometry(by_series[chosen.uid])
    headers = [i.header for i in instances]
    frames = {str(h.get("FrameOfReferenceUID", "")) for h in headers}
    if len(frames) > 1:
        raise SliceGeometryError(f"series {chosen.uid} has {len(frames)} different FrameOfReferenceUIDs: its slices "
                                 "do not share one patient coordinate system")
    files = [i.path for i in instances]
    origin = np.array([float(v) for v in headers[0].ImagePositionPatient])
    image = _read_pixels(files, direction, spacing, origin)
    notes = []
    others = [s for s in summaries if s.uid != chosen.uid and not s.is_image]
    if others:
        notes.append("skipped DICOM objects that are not images: " + "; ".join(s.describe() for s in others))
    if skipped:
        notes.append(f"skipped {skipped} files that are not DICOM instances")
    if frames == {""}:  # research tools often leave it out; a SEG needs it
        notes.append("the series has no FrameOfReferenceUID, so no DICOM SEG can be made on it")
    series = DicomSeries(
        folder=folder, files=tuple(files), sop_instance_uids=tuple(str(h.SOPInstanceUID) for h in headers),
        sop_class_uid=str(headers[0].SOPClassUID), study_instance_uid=str(headers[0].StudyInstanceUID),
        series_instance_uid=chosen.uid, frame_of_reference_uid=frames.pop(), modality=chosen.modality,
        description=chosen.description, headers=tuple(headers), notes=tuple(notes))
    return image, series


def refuse_non_image_file(path: PathLike) -> None:
    """Raise NotAnImageError when the file ``path`` is a DICOM object with no image to segment (SR, SEG, ...).

    Files that are not DICOM, and DICOM images, pass: the image reader deals with them.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        header = pydicom.dcmread(path, defer_size=1024)
    except (InvalidDicomError, OSError, EOFError, ValueError):
        return
    if "SOPClassUID" not in header:
        return
    summary = _summary(str(header.get("SeriesInstanceUID", "")), [_Instance(path, header, any(
        k in header for k in _PIXEL_KEYWORDS))])
    if not summary.is_image:
        raise NotAnImageError(f"{path.name} is {summary.kind}, not an image to segment" + _seg_hint(summary))
