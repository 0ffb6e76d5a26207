"""Slicer terminology entries for common targets (the Slicer module's copy of medsam_server/io/terminology.py).

Each entry is the category, type and type modifier that :func:`medsam_server.io.dicomseg.segment_code`
gives the same name (the tests check the two agree), so a segment made in Slicer and exported by
Slicer's own DICOM module carries the codes of the SEG that ``medsam annotate --output x.dcm`` writes.
Codes are (coding scheme, value, meaning).
"""

from __future__ import annotations

from typing import Optional

Code = tuple[str, str, str]

ANATOMY: Code = ("SCT", "91723000", "Anatomical Structure")
TISSUE: Code = ("SCT", "85756007", "Tissue")
ABNORMAL: Code = ("SCT", "49755003", "Morphologically Abnormal Structure")
RIGHT: Code = ("SCT", "24028007", "Right")
LEFT: Code = ("SCT", "7771000", "Left")

#: Lower-case segment name -> (category, type, modifier or None).
COMMON_TARGETS: dict[str, tuple[Code, Code, Optional[Code]]] = {
    "lung": (ANATOMY, ("SCT", "39607008", "Lung"), None),
    "right lung": (ANATOMY, ("SCT", "39607008", "Lung"), RIGHT),
    "left lung": (ANATOMY, ("SCT", "39607008", "Lung"), LEFT),
    "liver": (ANATOMY, ("SCT", "10200004", "Liver"), None),
    "spleen": (ANATOMY, ("SCT", "78961009", "Spleen"), None),
    "pancreas": (ANATOMY, ("SCT", "15776009", "Pancreas"), None),
    "kidney": (ANATOMY, ("SCT", "64033007", "Kidney"), None),
    "right kidney": (ANATOMY, ("SCT", "64033007", "Kidney"), RIGHT),
    "left kidney": (ANATOMY, ("SCT", "64033007", "Kidney"), LEFT),
    "adrenal gland": (ANATOMY, ("SCT", "23451007", "Adrenal gland"), None),
    "right adrenal gland": (ANATOMY, ("SCT", "23451007", "Adrenal gland"), RIGHT),
    "left adrenal gland": (ANATOMY, ("SCT", "23451007", "Adrenal gland"), LEFT),
    "heart": (ANATOMY, ("SCT", "80891009", "Heart"), None),
    "aorta": (ANATOMY, ("SCT", "15825003", "Aorta"), None),
    "spine": (ANATOMY, ("SCT", "421060004", "Spine"), None),
    "vertebra": (ANATOMY, ("SCT", "51282000", "Vertebra"), None),
    "brain": (ANATOMY, ("SCT", "12738006", "Brain"), None),
    "bladder": (ANATOMY, ("SCT", "89837001", "Bladder"), None),
    "prostate": (ANATOMY, ("SCT", "41216001", "Prostate"), None),
    "bone": (TISSUE, ("SCT", "3138006", "Bone"), None),
    "tumor": (ABNORMAL, ("SCT", "108369006", "Tumor"), None),
    "lesion": (ABNORMAL, ("SCT", "52988006", "Lesion"), None),
    "nodule": (ABNORMAL, ("SCT", "27925004", "Nodule"), None),
    "mass": (ABNORMAL, ("SCT", "4147007", "Mass"), None),
}

#: Slicer's names for the terminology contexts these codes come from.
CATEGORY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMY_CONTEXT = "Anatomic codes - DICOM master list"


def _coded(code: Optional[Code]) -> str:
    return "^".join(code) if code else "^^"


def slicer_terminology_entry(category: Code, type_: Code, modifier: Optional[Code] = None) -> str:
    """The string Slicer stores in a segment's terminology tag (``Segment.SetTag("TerminologyEntry", ...)``).

    Fields, '~'-separated: context, category, type, type modifier, anatomic context, anatomic region,
    region modifier; each code 'scheme^value^meaning' and '^^' when absent.
    """
    return "~".join((CATEGORY_CONTEXT, _coded(category), _coded(type_), _coded(modifier), ANATOMY_CONTEXT,
                     _coded(None), _coded(None)))


def terminology_for(name: str) -> Optional[str]:
    """Slicer's terminology entry for a common target name (case and '_'/'-' ignored), or None when not listed."""
    key = " ".join(name.lower().replace("_", " ").replace("-", " ").split())
    entry = COMMON_TARGETS.get(key)
    return slicer_terminology_entry(*entry) if entry else None
