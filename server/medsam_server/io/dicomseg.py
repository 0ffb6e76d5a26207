"""DICOM Segmentation (SEG) out and back: the labels of a run on a DICOM series, with highdicom.

What is written: a BINARY SEG with one segment per target (segment numbers 1..N in label
order), each with its name as the segment label, a coded category and type (SNOMED CT from
pydicom's code dictionary, looked up by the segment's name, or the code the user gave), the
display colour, and the algorithm (MedSAM / LiteMedSAM, this package's version, SEMIAUTOMATIC).
Frame k references the source slice k's SOP Instance UID; the SEG shares the series' Study
Instance UID and Frame of Reference UID. Empty frames are left out, as the standard allows.

What is read back (for ``--existing``): a SEG that references the series' instances, as (k, j, i)
labels on the series' grid, where a voxel in segment number n gets the value n.

highdicom and pydicom are imported here only, so importing ``medsam_server.io`` stays light.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .. import __version__
from ..errors import InputError
from .dicom import DicomSeries

PathLike = Union[str, "os.PathLike[str]"]
#: The output name that asks for a DICOM SEG.
SEG_SUFFIX = ".dcm"
#: Display names of the models in the SEG's algorithm identification.
ALGORITHM_NAMES = {"litemedsam": "LiteMedSAM", "medsam-vit-b": "MedSAM"}
#: A code as the prompt document gives it: [scheme, value, meaning], e.g. ["SCT", "39607008", "Lung"].
CodeSpec = Sequence[str]
_LATERALITY = {"right": "Right", "left": "Left", "bilateral": "Bilateral"}
#: Words users write for a concept whose dictionary keyword differs.
_SYNONYMS = {"tumour": "Tumor", "lungs": "Lung", "kidneys": "Kidney", "bones": "BoneTissue", "bone": "BoneTissue",
             "fat": "AdiposeTissue", "muscle": "MuscleTissue", "vertebrae": "Vertebra", "lesions": "Lesion"}


@dataclass(frozen=True)
class SegmentCode:
    """Coded category, type and optional type modifier (laterality) of a segment; each (scheme, value, meaning)."""

    category: tuple[str, str, str]
    type: tuple[str, str, str]
    modifier: Optional[tuple[str, str, str]] = None


@lru_cache(maxsize=1)
def _categories() -> dict[tuple[str, str], tuple[str, str, str]]:
    """(scheme, value) of every Segmentation Property Type (CID 7151) -> its category (CID 7150).

    The type's own context group says which category it belongs to: lesions are morphologically
    abnormal structures, devices and artifacts physical objects, common tissues tissue, the rest
    anatomy (the grouping Slicer's DICOM terminology uses too).
    """
    from pydicom.sr._cid_dict import cid_concepts
    from pydicom.sr.codedict import codes

    def triple(code) -> tuple[str, str, str]:
        return (code.scheme_designator, code.value, code.meaning)

    by_group = {7159: codes.cid7150.MorphologicallyAbnormalStructure, 7157: codes.cid7150.PhysicalObject,
                7158: codes.cid7150.PhysicalObject, 7166: codes.cid7150.Tissue, 7161: codes.cid7150.Function}
    table: dict[tuple[str, str], tuple[str, str, str]] = {}
    for cid in (7151, *by_group):
        category = triple(by_group.get(cid, codes.cid7150.AnatomicalStructure))
        for scheme, keywords in cid_concepts[cid].items():
            for keyword in keywords:
                code = getattr(getattr(codes, scheme), keyword)
                table[(code.scheme_designator, code.value)] = category
    return table


def _lookup(words: list[str]) -> Optional[tuple[str, str, str]]:
    from pydicom.sr.codedict import codes

    text = " ".join(words)
    keyword = _SYNONYMS.get(text) or "".join(w[:1].upper() + w[1:] for w in words)
    candidates = [keyword]
    if keyword.endswith("s"):
        candidates.append(keyword[:-1])
    for candidate in candidates:
        for scheme in ("SCT", "DCM"):
            try:
                code = getattr(getattr(codes, scheme), candidate)
            except AttributeError:
                continue
            if (code.scheme_designator, code.value) in _categories():
                return (code.scheme_designator, code.value, code.meaning)
    return None


def _as_triple(value, what: str) -> tuple[str, str, str]:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, str) and v.strip() for v in value)):
        raise InputError(f"{what} must be [scheme, value, meaning], e.g. [\"SCT\", \"39607008\", \"Lung\"]; "
                         f"got {value!r}")
    return (value[0].strip(), value[1].strip(), value[2].strip())


def segment_code(name: str, code: Optional[Union[CodeSpec, Mapping]] = None) -> SegmentCode:
    """The category, type and laterality for a segment called ``name``, or for the ``code`` the user gave.

    ``code`` is [scheme, value, meaning] for the type, or ``{"type": [...], "category": [...]}``;
    the category may be left out when the type is in the DICOM segmentation types (CID 7151).
    Without ``code`` the name is looked up: "right lung" -> Lung with modifier Right,
    "liver" -> Liver, "tumor" -> Neoplasm. A name that is not found is an InputError that says
    how to give the code.
    """
    if code is not None:
        spec = code if isinstance(code, Mapping) else {"type": code}
        unknown = sorted(set(spec) - {"type", "category", "modifier"})
        if unknown or "type" not in spec:
            raise InputError(f"segment {name!r}: code must be [scheme, value, meaning] or an object with "
                             f"'type' and optionally 'category' and 'modifier'; got {code!r}")
        kind = _as_triple(spec["type"], f"segment {name!r}: code")
        category = (_as_triple(spec["category"], f"segment {name!r}: category") if "category" in spec
                    else _categories().get(kind[:2]))
        if category is None:
            raise InputError(
                f"segment {name!r}: code {list(kind)} is not a DICOM segmentation type whose category is known; add "
                "its category, e.g. \"code\": {\"type\": [...], \"category\": [\"SCT\", \"91723000\", "
                "\"Anatomical Structure\"]} (or [\"SCT\", \"49755003\", \"Morphologically Abnormal Structure\"])")
        modifier = _as_triple(spec["modifier"], f"segment {name!r}: modifier") if "modifier" in spec else None
        return SegmentCode(category=category, type=kind, modifier=modifier)
    from pydicom.sr.codedict import codes

    words = name.lower().replace("_", " ").replace("-", " ").split()
    side = [w for w in words if w in _LATERALITY]
    words = [w for w in words if w not in _LATERALITY]
    kind = _lookup(words) if words else None
    if kind is None:
        raise InputError(
            f"segment {name!r}: no SNOMED CT segmentation type is known by that name; name it after the structure "
            "(e.g. \"left lung\", \"liver\", \"tumor\") or give its code in the prompt document, e.g. "
            "\"code\": [\"SCT\", \"39607008\", \"Lung\"]")
    modifier = None
    if len(side) == 1:
        laterality = getattr(codes.SCT, _LATERALITY[side[0]])
        modifier = (laterality.scheme_designator, laterality.value, laterality.meaning)
    return SegmentCode(category=_categories()[kind[:2]], type=kind, modifier=modifier)


def _coded(triple: tuple[str, str, str]):
    from highdicom.sr import CodedConcept

    scheme, value, meaning = triple
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _segment_descriptions(segments, codes: Mapping[str, object], algorithm: str) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes as dictionary

    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm, family=dictionary.cid7162.ArtificialIntelligence, version=__version__,
        source="MedSAMSlicer (medsam-slicer-server)")
    descriptions = []
    for number, (name, _label, colour) in enumerate(segments, start=1):
        coded = segment_code(name, codes.get(name))
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=str(name), segmented_property_category=_coded(coded.category),
            segmented_property_type=_coded(coded.type), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=identification,
            display_color=hd.color.CIELabColor.from_rgb(*(int(round(255 * float(c))) for c in colour)))
        if coded.modifier is not None:
            # The modifier (laterality) sits inside the type's code item, where readers such as Slicer look.
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                _coded(coded.modifier)]
        descriptions.append(description)
    return descriptions


def write_seg(
    path: PathLike,
    labels: np.ndarray,
    series: DicomSeries,
    segments: Sequence[tuple[str, int, tuple[float, float, float]]],
    *,
    model: str = "litemedsam",
    codes: Optional[Mapping[str, object]] = None,
    series_description: str = "MedSAM segmentation",
    replace: bool = True,
) -> Path:
    """Write (k, j, i) ``labels`` on ``series``' grid as a DICOM SEG at ``path``; return the path.

    ``segments`` are (name, label, (r, g, b) in 0..1) as for ``write_labels``; each becomes one
    segment, numbered 1..N in order of label. ``codes`` maps a segment name to the code the user
    gave for it (see :func:`segment_code`); other names are looked up. ``model`` is the model's
    CLI name. Everything is checked before a byte is written; the file appears only when complete,
    and with ``replace=False`` never over a file of that name, even one that appeared meanwhile.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    path = Path(path)
    check_seg_source(series)
    labels = np.asarray(labels)
    expected = (series.slices, int(series.headers[0].Rows), int(series.headers[0].Columns))
    if labels.shape != expected:
        raise InputError(f"labels have shape {labels.shape} but the DICOM series is (k, j, i) = {expected}")
    ordered = sorted(segments, key=lambda s: int(s[1]))
    unnamed = sorted({int(v) for v in np.unique(labels)} - {0} - {int(s[1]) for s in ordered})
    if unnamed:
        raise InputError(f"labels {unnamed} appear in the label array but in no segment")
    if not ordered:
        raise InputError("a DICOM SEG needs at least one segment")
    descriptions = _segment_descriptions(ordered, codes or {}, ALGORITHM_NAMES.get(model, model))
    stacked = np.stack([labels == int(label) for _, label, _ in ordered], axis=-1).astype(np.uint8)
    try:
        seg = hd.seg.Segmentation(
            source_images=list(series.headers), pixel_array=stacked,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=generate_uid(), series_number=_series_number(series), sop_instance_uid=generate_uid(),
            instance_number=1, manufacturer="MedSAMSlicer", manufacturer_model_name="medsam-slicer-server",
            software_versions=__version__, device_serial_number="none", series_description=series_description,
            content_label="MEDSAM", content_description=f"{ALGORITHM_NAMES.get(model, model)} segmentation")
    except ValueError as err:  # highdicom's checks of the source images' attributes
        raise InputError(f"cannot make a DICOM SEG from the series in {series.folder}: {err}") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{secrets.token_hex(4)}-{path.name}"
        try:
            seg.save_as(tmp)
            if replace:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)  # fails if the name was taken while the labels were computed
        finally:
            tmp.unlink(missing_ok=True)
    except FileExistsError:
        raise InputError(f"{path} appeared while the labels were computed; it was kept as it is. Pass --force to "
                         "replace it, or choose another output") from None
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}") from None
    return path


def check_seg_source(series: DicomSeries) -> None:
    """Raise InputError when no SEG can be made on ``series`` (checked before a run, not after it)."""
    if not series.frame_of_reference_uid:
        raise InputError(f"the DICOM series in {series.folder} has no FrameOfReferenceUID, which a DICOM SEG needs to "
                         "place its frames; write a .seg.nrrd or a labelmap instead")


def _series_number(series: DicomSeries) -> int:
    """One past the source's series number, so viewers list the SEG next to its image."""
    number = series.headers[0].get("SeriesNumber")
    return int(number) + 100 if number is not None else 100


def read_seg(path: PathLike, series: DicomSeries) -> tuple[np.ndarray, dict[int, str]]:
    """A DICOM SEG made on ``series`` -> (k, j, i) labels on the series' grid and {segment number: label}.

    The SEG must reference the series' instances (as those this module writes do) and share its
    Frame of Reference UID. Where segments overlap, the higher segment number wins. A fractional
    SEG is cut at one half.
    """
    import highdicom as hd
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    what = path.name
    if not path.is_file():
        raise InputError(f"segmentation {path} does not exist")
    try:
        seg = hd.seg.segread(path)
    except (InvalidDicomError, AttributeError, KeyError, ValueError) as err:
        raise InputError(f"cannot read {what} as a DICOM Segmentation: {err}") from None
    frame = str(seg.get("FrameOfReferenceUID", ""))
    if frame and frame != series.frame_of_reference_uid:
        raise InputError(f"{what} has Frame of Reference UID {frame} but the series has "
                         f"{series.frame_of_reference_uid}: it was made on another scan")
    referenced = _referenced_instances(seg)
    ours = set(series.sop_instance_uids)
    if not referenced & ours:
        raise InputError(f"{what} references none of the {series.slices} instances of series "
                         f"{series.series_instance_uid}: it belongs to another series")
    foreign = referenced - ours
    if foreign:
        raise InputError(f"{what} references {len(foreign)} instances that are not in series "
                         f"{series.series_instance_uid} (a slice missing from the folder?)")
    numbers = list(seg.segment_numbers)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(series.sop_instance_uids), segment_numbers=numbers,
        assert_missing_frames_are_empty=True)
    cut = 0.5 if np.issubdtype(pixels.dtype, np.floating) else 0
    labels = np.zeros(pixels.shape[:3], dtype=np.uint16)
    for position, number in enumerate(numbers):
        labels[pixels[..., position] > cut] = number
    names = {int(n): str(seg.get_segment_description(n).segment_label) for n in numbers}
    return labels, names


def _referenced_instances(seg) -> set[str]:
    uids = set()
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                uids.add(str(source.ReferencedSOPInstanceUID))
    return uids


def is_dicom_seg(path: PathLike) -> bool:
    """Whether ``path`` is a DICOM Segmentation file (by its SOP class; DICOM files often have no extension)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from .dicom import SEGMENTATION_SOP_CLASSES

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (InvalidDicomError, OSError, EOFError, ValueError):
        return False
    return str(header.get("SOPClassUID", "")) in SEGMENTATION_SOP_CLASSES
