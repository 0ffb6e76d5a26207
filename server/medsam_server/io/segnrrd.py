"""Slicer segmentation files (``.seg.nrrd``): the one reader and the one writer.

A ``.seg.nrrd`` holds one or more *layers* of voxels (i, j, k); each segment is the voxels
of its layer equal to its ``labelValue``. Slicer writes only the extent that holds segments
(the file's origin is that block's first voxel), and puts overlapping segments in separate
layers, where they may share a ``labelValue``.

One behaviour for every command (annotate's ``--existing``, simulate's reference, evaluate):
a segment's label is its ``labelValue``. Two segments sharing one are refused with a message
naming both: renumbering them would silently change the label the prompt document and a
reference are matched by, and flattening them would silently drop the voxels where they
overlap. (Before, ``read_labels`` renumbered such segments 1..N and ``evaluate`` refused them.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError
from .labels import LabelFile


def is_segmentation(path: Path) -> bool:
    """A ``.seg.nrrd``, or a ``.nrrd`` whose header names segments."""
    name = path.name.lower()
    if name.endswith(".seg.nrrd"):
        return True
    if not name.endswith(".nrrd"):
        return False
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception:  # not a readable NRRD header: SimpleITK will say what is wrong
        return False
    return any(key.startswith("Segment0_") for key in header)


def read(path: Path) -> LabelFile:
    """The segments of a ``.seg.nrrd`` on the file's own (possibly cropped) grid."""
    import slicerio

    what = Path(path).name
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as err:  # slicerio raises plain exceptions of several types
        raise InputError(f"cannot read {what} as a Slicer segmentation: {err}") from None
    voxels = np.asarray(segmentation["voxels"])  # (i, j, k) or (layers, i, j, k)
    layers = voxels[None] if voxels.ndim == 3 else voxels
    if layers.ndim != 4:
        raise InputError(f"{what} has a {voxels.ndim}D voxel array; a segmentation is 3D (or 4D with layers)")
    labels: dict[int, tuple[int, int]] = {}
    names: dict[int, str] = {}
    for segment in segmentation.get("segments", []):
        value, layer = int(segment.get("labelValue", 1)), int(segment.get("layer", 0))
        name = str(segment.get("name", segment.get("id", f"label {value}")))
        if value <= 0:
            raise InputError(f"{what}: segment {name!r} has label value {value}; label values start at 1")
        if value in labels:
            raise InputError(f"{what}: segments {names[value]!r} and {name!r} share label value {value} "
                             "(overlapping segments in different layers); give each segment its own label value "
                             "(in Slicer: export the segmentation to a labelmap)")
        labels[value], names[value] = (layer, value), name
    ijk_to_lps = np.asarray(segmentation["ijkToLPS"], dtype=np.float64)
    columns = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing == 0):
        raise InputError(f"{what} has a zero voxel spacing")
    return LabelFile(path=str(path), layers=np.ascontiguousarray(layers.transpose(0, 3, 2, 1)), labels=labels,
                     names=names, spacing=tuple(float(s) for s in spacing),
                     origin=tuple(float(o) for o in ijk_to_lps[:3, 3]), direction=columns / spacing, cropped=True)


def _geometry_string(ijk_to_lps: np.ndarray, size: Sequence[int]) -> str:
    """Slicer's serialised image geometry: the IJK-to-RAS matrix row by row, then the extent."""
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps
    i, j, k = size
    values = [f"{v:.17g}" for v in ijk_to_ras.ravel()] + [str(v) for v in (0, i - 1, 0, j - 1, 0, k - 1)]
    return ";".join(values) + ";"


def write(path: Path, labels: np.ndarray, ijk_to_lps: np.ndarray,
          segments: Sequence[tuple[str, int, tuple[float, float, float]]]) -> None:
    """Write (k, j, i) ``labels`` as one layer with named, coloured segments (name, label, (r, g, b) 0..1)."""
    import slicerio

    k, j, i = labels.shape
    segmentation = {
        "voxels": labels.transpose(2, 1, 0),  # slicerio wants (i, j, k); written in Fortran order, no copy
        "ijkToLPS": ijk_to_lps,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        # The grid Slicer edits the segmentation on. Written as the raw header field (slicerio copies
        # unknown keys verbatim) because Slicer only parses parameters that end with "&", which
        # slicerio's own "conversionParameters" writer leaves off the last one.
        "Segmentation_ConversionParameters": "Reference image geometry|" + _geometry_string(ijk_to_lps, (i, j, k))
        + "|Image geometry description string determining the geometry of the labelmap that is created in "
        "course of conversion.&",
        "segments": [
            {"id": f"Segment_{int(label)}", "name": str(name), "nameAutoGenerated": False,
             "color": [float(c) for c in colour], "colorAutoGenerated": False,
             "labelValue": int(label), "layer": 0}
            for name, label, colour in segments
        ],
    }
    # Level 1: labelmaps compress well even so, and level 9 costs seconds on a full CT.
    slicerio.write_segmentation(str(path), segmentation, compression_level=1)
