"""Masks <-> segments: read a segment on the volume's grid, write a run's result as one undo step, find hand edits.

Hand edits: after each run, a digest of every slice the run wrote is kept in a segment tag
(``DIGEST_TAG``, saved with the segmentation). On the next run a slice whose content no
longer matches its digest -- or a non-empty slice no run wrote -- was made by hand; it is
sent as a locked slice and is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .errors import InputError
from .geometry import (
    ijk_to_world,
    in_plane_axes,
    node_name,
    node_to_world,
    slab_index,
    slice_index,
    vtk_matrix_from_array,
)
from .terminology import terminology_for

DIGEST_TAG = "MedSAMSlicer.RunDigests"  # on a segment: JSON record of what the runs wrote

def register_segmentation_converters() -> None:
    """Register the segmentation representation converters (Slicer's Segmentations module does this at startup).

    Needed once per process when MRML runs without the application (``slicer-core``); harmless in Slicer.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    have = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for name in ("vtkBinaryLabelmapToClosedSurfaceConversionRule", "vtkClosedSurfaceToBinaryLabelmapConversionRule",
                 "vtkClosedSurfaceToFractionalLabelmapConversionRule",
                 "vtkFractionalLabelmapToClosedSurfaceConversionRule"):
        if name not in have and hasattr(slicer, name):
            factory.RegisterConverterRule(getattr(slicer, name)())

# ------------------------------------------------------------------------------------------------ segments


def find_segment(segmentation_node, segment_id: str):
    if segmentation_node is None:
        raise InputError("select a segmentation first")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None
    if segment is None:
        raise InputError(f"segmentation '{node_name(segmentation_node)}' has no segment '{segment_id}'; "
                         "select or add a segment")
    return segment


def _geometry_in_segmentation(volume_node, segmentation_node) -> np.ndarray:
    """4x4 volume IJK -> segmentation-node coordinates (the frame its labelmaps live in)."""
    return np.linalg.inv(node_to_world(segmentation_node)) @ ijk_to_world(volume_node)


def _oriented_image(array_kji: np.ndarray, offset_ijk: Sequence[int], ijk_to_frame: np.ndarray):
    """A vtkOrientedImageData holding ``array_kji`` at extent offset ``offset_ijk`` of a volume grid."""
    image = slicer.vtkOrientedImageData()
    nk, nj, ni = array_kji.shape
    i0, j0, k0 = (int(v) for v in offset_ijk)
    image.SetExtent(i0, i0 + ni - 1, j0, j0 + nj - 1, k0, k0 + nk - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nk, nj, ni)[:] = array_kji
    image.SetImageToWorldMatrix(vtk_matrix_from_array(ijk_to_frame))
    return image


def segment_array(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a (k, j, i) uint8 0/1 array on the volume's voxel grid (nearest neighbour)."""
    segment = find_segment(segmentation_node, segment_id)
    size = volume_node.GetImageData().GetDimensions()
    out = np.zeros(tuple(reversed(size)), dtype=np.uint8)
    labelmap = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentation_node, segment_id, labelmap, False):
        raise InputError(f"segment '{segment.GetName()}' has no binary labelmap; "
                         "open it in the Segment Editor once to convert it")
    extent = labelmap.GetExtent()
    if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
        return out  # an empty segment
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, size[0] - 1, 0, size[1] - 1, 0, size[2] - 1)
    reference.SetImageToWorldMatrix(vtk_matrix_from_array(_geometry_in_segmentation(volume_node, segmentation_node)))
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, reference, resampled, False, False):
        raise RuntimeError(f"could not resample segment '{segment.GetName()}' onto the volume grid")
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(out.shape)
    # A labelmap may be shared by several segments (one layer, one value each).
    out[:] = values == segment.GetLabelValue()
    return out


def slice_digest(plane: np.ndarray) -> str:
    """Short digest of one slice's mask (only which voxels are set counts)."""
    packed = np.packbits(np.ascontiguousarray(plane, dtype=bool))
    return hashlib.blake2b(packed.tobytes() + repr(plane.shape).encode(), digest_size=8).hexdigest()


def _read_record(segment, size_ijk: Sequence[int], axis: int) -> dict[int, str]:
    """The slice digests the runs recorded, or {} when none or for another grid or axis."""
    value = vtk.reference("")
    text = str(value) if segment.GetTag(DIGEST_TAG, value) else ""
    if not text:
        return {}
    try:
        record = json.loads(text)
        if list(record["size"]) != list(size_ijk) or record["axis"] != axis:
            return {}
        return {int(k): str(v) for k, v in record["slices"].items()}
    except (ValueError, KeyError, TypeError):
        return {}


def _write_record(segment, size_ijk: Sequence[int], axis: int, slices: dict[int, str]) -> None:
    record = {"size": [int(s) for s in size_ijk], "axis": int(axis),
              "slices": {str(k): v for k, v in sorted(slices.items())}}
    segment.SetTag(DIGEST_TAG, json.dumps(record, separators=(",", ":")))


def edited_slices(segmentation_node, segment_id: str, volume_node, axis: int,
                  current: np.ndarray | None = None) -> list[int]:
    """Slices along ``axis`` edited by hand since the last run: they differ from what the run wrote,
    or hold voxels that no run wrote. ``current`` is ``segment_array(...)`` when the caller has it."""
    segment = find_segment(segmentation_node, segment_id)
    if current is None:
        current = segment_array(segmentation_node, segment_id, volume_node)
    size_ijk = tuple(reversed(current.shape))
    record = _read_record(segment, size_ijk, axis)
    edited = []
    for index in range(size_ijk[axis]):
        plane = current[slice_index(axis, index)]
        recorded = record.get(index)
        if recorded is None:
            if plane.any():
                edited.append(index)
        elif recorded != slice_digest(plane):
            edited.append(index)
    return edited


@dataclass
class AppliedRun:
    """What ``apply_labels`` did: slices along the axis it changed, the locked slices it left alone."""

    changed_slices: list[int]
    locked_slices: list[int]
    voxels: int  # voxels of the segment on the slices the run covered, after writing


def _ensure_binary_labelmap(segmentation_node, volume_node) -> None:
    segmentation = segmentation_node.GetSegmentation()
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if segmentation.GetSourceRepresentationName() != binary:
        segmentation.CreateRepresentation(binary)
        segmentation.SetSourceRepresentationName(binary)
    reference_role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    if segmentation_node.GetNodeReference(reference_role) is None and segmentation.GetNumberOfSegments() <= 1:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)


TERMINOLOGY_TAG = "TerminologyEntry"
#: What vtkSegmentation gives a new segment: the generic "Tissue" of Slicer's own list, no one's choice.
GENERIC_TERMINOLOGY_TYPE = "~SCT^85756007^Tissue~SCT^85756007^Tissue~"


def tag_terminology(segment) -> bool:
    """Give a segment with a common target name (``terminology.COMMON_TARGETS``) its terminology entry.

    Only a segment that has none or the generic default gets one, so a terminology the user picked stays.
    Returns whether the tag was set.
    """
    entry = terminology_for(segment.GetName() or "")
    value = vtk.reference("")
    current = str(value) if segment.GetTag(TERMINOLOGY_TAG, value) else ""
    if entry is None or (current and GENERIC_TERMINOLOGY_TYPE not in current):
        return False
    segment.SetTag(TERMINOLOGY_TAG, entry)
    return True


def add_segment(segmentation_node, name: str = "") -> str:
    """A new empty segment (Slicer names it when ``name`` is empty), with its terminology for a known name."""
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.AddEmptySegment(name, name) if name else segmentation.AddEmptySegment()
    tag_terminology(segmentation.GetSegment(segment_id))
    return segment_id


def apply_labels(volume_node, segmentation_node, segment_id: str, ijk_offset: Sequence[int], labels: np.ndarray,
                 *, label: int = 1, axis: int = 2, locked_slices: Sequence[int] = (),
                 save_undo_state: Callable[[], Any] | None = None) -> AppliedRun:
    """Write a server result into one segment as one undoable step.

    ``labels`` is a (k, j, i) integer block placed at IJK ``ijk_offset`` = (i0, j0, k0) of the volume's grid;
    voxels equal to ``label`` belong to the segment. The block's slices along ``axis`` are the run's full
    answer for those slices (voxels of a slice outside the block are outside the segment). Only slices whose
    content changes are written, locked slices never are, and other slices and other segments stay as they
    were. ``save_undo_state`` (e.g. the Segment Editor's ``saveStateForUndo``) is called once before the
    first change. Raises InputError before writing anything if the block does not fit the volume.
    """
    segment = find_segment(segmentation_node, segment_id)
    labels = np.asarray(labels)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"a result block is a (k, j, i) integer array, got {labels.dtype} {labels.shape}")
    if labels.size == 0:  # the run changed nothing
        return AppliedRun(changed_slices=[], locked_slices=[], voxels=0)
    size_ijk = volume_node.GetImageData().GetDimensions()
    offset = [int(v) for v in ijk_offset]
    block_ijk = tuple(reversed(labels.shape))
    if len(offset) != 3 or any(offset[a] < 0 or offset[a] + block_ijk[a] > size_ijk[a] for a in range(3)):
        raise InputError(f"the result block {block_ijk} at IJK offset {tuple(offset)} does not fit the volume "
                         f"{tuple(size_ijk)}; was the volume changed during the run?")
    in_plane_axes(axis)
    current = segment_array(segmentation_node, segment_id, volume_node)
    first, stop = offset[axis], offset[axis] + block_ijk[axis]
    proposed = current[slab_index(axis, first, stop)].copy()
    proposed[:] = 0
    region = [slice(None)] * 3
    for a in range(3):
        if a != axis:
            region[2 - a] = slice(offset[a], offset[a] + block_ijk[a])
    proposed[tuple(region)] = labels == label
    locked = sorted({int(s) for s in locked_slices if first <= int(s) < stop})
    changed = []
    for index in range(first, stop):
        local = slice_index(axis, index - first)
        if index in locked:
            proposed[local] = current[slice_index(axis, index)]
        elif not np.array_equal(proposed[local], current[slice_index(axis, index)]):
            changed.append(index)

    if changed:
        if save_undo_state is not None:
            save_undo_state()
        _ensure_binary_labelmap(segmentation_node, volume_node)
        lo, hi = changed[0], changed[-1] + 1
        modifier_array = proposed[slab_index(axis, lo - first, hi - first)]
        modifier_offset = [0, 0, 0]
        modifier_offset[axis] = lo
        modifier = _oriented_image(modifier_array, modifier_offset,
                                   _geometry_in_segmentation(volume_node, segmentation_node))
        extent = modifier.GetExtent()
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        # "Set" within the slab, as the Segment Editor does it: erase the segment where the new mask is empty,
        # then add the new mask. Other segments keep their voxels (the segment moves to its own layer if needed).
        if not logic.SetBinaryLabelmapToSegment(modifier, segmentation_node, segment_id, logic.MODE_MERGE_MIN, extent):
            raise RuntimeError(f"could not clear slices {lo}..{hi - 1} of segment '{segment.GetName()}'")
        if not logic.SetBinaryLabelmapToSegment(modifier, segmentation_node, segment_id, logic.MODE_MERGE_MASK, extent):
            raise RuntimeError(f"could not write slices {lo}..{hi - 1} of segment '{segment.GetName()}'")

    after = segment_array(segmentation_node, segment_id, volume_node) if changed else current
    record = _read_record(segment, size_ijk, axis)
    for index in range(first, stop):
        if index not in locked:
            record[index] = slice_digest(after[slice_index(axis, index)])
    _write_record(segment, size_ijk, axis, record)
    voxels = int(after[slab_index(axis, first, stop)].sum())
    tag_terminology(segment)  # a segment renamed to a known target after it was made
    return AppliedRun(changed_slices=changed, locked_slices=locked, voxels=voxels)

