"""MRML <-> arrays for MedSAMSlicer: volumes, keyframe markups, prompt documents, masks into segments.

No qt and no torch: this runs inside Slicer and headless against the ``slicer-core`` wheel.

Frames
- *IJK*: voxel indices of the source volume, in the order SimpleITK's ``GetSize()`` reports them
  (i, j, k). Numpy arrays of a volume are ``(k, j, i)`` (``(k, j, i, 3)`` for RGB), as
  ``slicer.util.arrayFromVolume`` and SimpleITK's ``GetArrayFromImage`` give them.
- *world*: Slicer's RAS after all parent transforms. ``ijk_to_world`` is a 4x4 matrix; only
  linear parent transforms are supported (a warped volume must be hardened first).
- *slice pixels*: a slice taken along ``axis`` has columns along ``u`` and rows along ``v``,
  where (u, v) are the two other IJK axes in increasing order (DESIGN.md section 4). A box is
  ``[u_min, v_min, u_max, v_max]``, inclusive voxel indices.

The run is three steps so that the slow one can leave the UI thread:
``prepare_run`` (reads MRML, main thread) -> ``execute_run`` (server call, arrays only, any
thread) -> ``apply_run`` (writes the segment, main thread). A failed or cancelled
``execute_run`` never reaches ``apply_run``, so the segmentation is untouched.

Hand edits: after each run, a digest of every slice the run wrote is kept in a segment tag
(``DIGEST_TAG``, saved with the segmentation). On the next run a slice whose content no
longer matches its digest -- or a non-empty slice no run wrote -- was made by hand; it is
sent as a locked slice and is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

KEYFRAME_ATTRIBUTE = "MedSAMSlicer.Keyframe"  # on a markups node: "<segmentation node ID>|<segment ID>"
DIGEST_TAG = "MedSAMSlicer.RunDigests"  # on a segment: JSON record of what the runs wrote
WINDOWS = ("auto", "ct-soft", "ct-lung", "ct-bone", "ct-brain", "mr")
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
_EPS = 1e-6


class InputError(ValueError):
    """Something the user gave (nodes, markups, settings) cannot be used; the message says what to change."""


# ------------------------------------------------------------------------------------------------ small helpers


def in_plane_axes(axis: int) -> tuple[int, int]:
    """IJK axes (u, v) of a slice taken along ``axis``: columns along u, rows along v."""
    if axis not in (0, 1, 2):
        raise InputError(f"axis must be 0, 1 or 2, got {axis!r}")
    u, v = (a for a in (0, 1, 2) if a != axis)
    return u, v


def slice_index(axis: int, index: int) -> tuple:
    """Numpy index of slice ``index`` along IJK ``axis`` in a (k, j, i[, c]) array."""
    where: list = [slice(None)] * 3
    where[2 - axis] = index
    return tuple(where)


def slab_index(axis: int, start: int, stop: int) -> tuple:
    """Numpy index of slices ``start..stop-1`` along IJK ``axis`` in a (k, j, i) array."""
    where: list = [slice(None)] * 3
    where[2 - axis] = slice(start, stop)
    return tuple(where)


def array_from_vtk_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def vtk_matrix_from_array(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


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


def node_to_world(node) -> np.ndarray:
    """4x4 matrix from a transformable node's own coordinates to world; raises for non-linear transforms."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"'{node.GetName()}' is under the non-linear transform '{parent.GetName()}'; "
                         "harden the transform (Transforms module) and try again")
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return array_from_vtk_matrix(matrix)


def ijk_to_world(volume_node) -> np.ndarray:
    """4x4 IJK -> world (RAS) matrix of a volume, parent transforms included."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return node_to_world(volume_node) @ array_from_vtk_matrix(matrix)


def _node_name(node) -> str:
    return node.GetName() or node.GetID() or node.GetClassName()


# ------------------------------------------------------------------------------------------------ volumes


@dataclass
class VolumeArray:
    """A volume's voxels and geometry, detached from MRML (safe to hand to another thread).

    ``array`` is (k, j, i) scalars or (k, j, i, 3) RGB; ``ijk_to_world`` maps (i, j, k, 1) to RAS.
    """

    array: np.ndarray
    ijk_to_world: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        k, j, i = self.array.shape[:3]
        return int(i), int(j), int(k)

    @property
    def rgb(self) -> bool:
        return self.array.ndim == 4

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along i, j, k in millimetres."""
        return tuple(float(s) for s in np.linalg.norm(self.ijk_to_world[:3, :3], axis=0))

    @property
    def direction_ras(self) -> np.ndarray:
        """3x3 unit direction matrix in RAS, columns the i, j, k axes."""
        return self.ijk_to_world[:3, :3] / np.array(self.spacing)

    @property
    def direction_lps(self) -> np.ndarray:
        """3x3 direction in LPS (SimpleITK's ``GetDirection`` reshaped), columns the i, j, k axes."""
        return LPS_FROM_RAS @ self.direction_ras

    @property
    def origin_lps(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in LPS_FROM_RAS @ self.ijk_to_world[:3, 3])

    def world_to_ijk(self, points_world: np.ndarray) -> np.ndarray:
        """(N, 3) RAS points -> (N, 3) continuous IJK (voxel centres at integers)."""
        inverse = np.linalg.inv(self.ijk_to_world)
        points = np.asarray(points_world, dtype=np.float64).reshape(-1, 3)
        return points @ inverse[:3, :3].T + inverse[:3, 3]


def add_volume_node(scene, array: np.ndarray, ijk_to_ras: np.ndarray | None = None, name: str = "",
                    class_name: str | None = None):
    """Add a volume node holding a copy of ``array`` to ``scene`` (``slicer.util.addVolumeFromArray`` needs the app).

    ``array`` is (k, j, i) scalars, (k, j, i, 3) colour, a 2D image (j, i) or, with ``class_name``
    "vtkMRMLVectorVolumeNode", a colour image (j, i, 3); 2D images become one slice. ``ijk_to_ras`` is a
    4x4 matrix (identity by default). Arrays with channels make a vtkMRMLVectorVolumeNode.
    """
    array = np.asarray(array)
    vector_class = class_name == "vtkMRMLVectorVolumeNode"
    if array.ndim == 2 or (array.ndim == 3 and vector_class):  # one slice: (j, i) or (j, i, c)
        array = array[np.newaxis]
    if array.ndim not in (3, 4):
        raise InputError(f"a volume array is (k, j, i) or (k, j, i, 3), got shape {array.shape}")
    components = array.shape[3] if array.ndim == 4 else 1
    class_name = class_name or ("vtkMRMLVectorVolumeNode" if components > 1 else "vtkMRMLScalarVolumeNode")
    image = vtk.vtkImageData()
    nk, nj, ni = array.shape[:3]
    image.SetDimensions(ni, nj, nk)
    image.AllocateScalars(numpy_support.get_vtk_array_type(array.dtype), components)
    target = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    target[:] = np.ascontiguousarray(array).reshape(target.shape)
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetIJKToRASMatrix(vtk_matrix_from_array(np.eye(4) if ijk_to_ras is None else np.asarray(ijk_to_ras)))
    node.SetAndObserveImageData(image)
    return node


def volume_array(volume_node, copy: bool = True) -> VolumeArray:
    """Copy a scalar or vector (RGB) volume node into a :class:`VolumeArray`.

    A single-slice image (a 2D X-ray or photo) is a volume of one slice. RGBA drops its alpha channel.
    ``copy=False`` gives a read-only view of the node's voxels instead, for geometry questions asked on
    the main thread (no copy of a large volume); never hand such a view to another thread.
    """
    if volume_node is None:
        raise InputError("select a volume first")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"volume '{_node_name(volume_node)}' has no voxels (is it still loading?)")
    ni, nj, nk = image.GetDimensions()
    components = image.GetNumberOfScalarComponents()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    notes = []
    if components == 1:
        array = scalars.reshape(nk, nj, ni)
    elif components in (3, 4):
        array = scalars.reshape(nk, nj, ni, components)[..., :3]
        if components == 4:
            notes.append(f"volume '{_node_name(volume_node)}' is RGBA: the alpha channel is not used")
    else:
        raise InputError(f"volume '{_node_name(volume_node)}' has {components} components per voxel; "
                         "MedSAM reads grayscale (1) or colour (3) images")
    if copy:
        array = np.array(array, order="C")  # always a copy, contiguous
    else:
        array = array.view()
        array.flags.writeable = False
    return VolumeArray(array=array, ijk_to_world=ijk_to_world(volume_node), notes=notes)


# ------------------------------------------------------------------------------------------------ keyframes


@dataclass(frozen=True)
class BoxKeyframe:
    """A box on one slice: ``box`` is [u_min, v_min, u_max, v_max] inclusive voxel indices."""

    slice: int
    box: tuple[int, int, int, int]
    name: str = ""


@dataclass(frozen=True)
class LineKeyframe:
    """A RECIST line (long or short axis) on one slice: two end points (u, v) in continuous voxel indices."""

    slice: int
    points: tuple[tuple[float, float], tuple[float, float]]
    name: str = ""


def roi_corners_world(roi_node) -> np.ndarray:
    """(8, 3) RAS corners of a markups ROI (its own orientation and parent transforms included)."""
    if roi_node.GetNumberOfControlPoints() < 1:
        raise InputError(f"ROI '{_node_name(roi_node)}' is not placed yet: draw it in a slice view")
    object_to_world = array_from_vtk_matrix(roi_node.GetObjectToWorldMatrix())
    half = np.array(roi_node.GetSize(), dtype=np.float64) / 2.0
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    corners = signs * half
    return corners @ object_to_world[:3, :3].T + object_to_world[:3, 3]


def line_points_world(line_node) -> np.ndarray:
    """(2, 3) RAS end points of a markups line."""
    if line_node.GetNumberOfControlPoints() < 2:
        raise InputError(f"line '{_node_name(line_node)}' needs two points: finish drawing it")
    points = np.zeros((2, 3))
    for n in range(2):
        position = [0.0, 0.0, 0.0]
        line_node.GetNthControlPointPositionWorld(n, position)
        points[n] = position
    return points


def _flat_axis(extent_ijk: np.ndarray) -> int | None:
    """The IJK axis along which a markup is flat (at most ~1.5 voxels and clearly thinner than the others)."""
    order = np.argsort(extent_ijk)
    thinnest, second = extent_ijk[order[0]], extent_ijk[order[1]]
    if thinnest <= 1.5 and thinnest < 0.5 * second:
        return int(order[0])
    return None


def roi_flat_axis(roi_node, volume: VolumeArray) -> int | None:
    """The IJK axis along which an ROI is flat (drawn thin in a slice view, or flattened), else None."""
    corners = volume.world_to_ijk(roi_corners_world(roi_node))
    return _flat_axis(corners.max(axis=0) - corners.min(axis=0))


def view_axis(slice_node, volume: VolumeArray) -> int:
    """The IJK axis closest to a slice view's normal: the axis along which that view steps through slices."""
    slice_to_ras = array_from_vtk_matrix(slice_node.GetSliceToRAS())
    normal = slice_to_ras[:3, 2] / np.linalg.norm(slice_to_ras[:3, 2])
    return int(np.argmax(np.abs(normal @ volume.direction_ras)))


def view_through(slice_nodes: Sequence, point_world: Sequence[float], tolerance_mm: float = 0.5):
    """The one slice view whose plane passes through ``point_world`` (where a markup was just drawn), else None."""
    point = np.asarray(point_world, dtype=np.float64)
    found = []
    for node in slice_nodes:
        slice_to_ras = array_from_vtk_matrix(node.GetSliceToRAS())
        normal = slice_to_ras[:3, 2] / np.linalg.norm(slice_to_ras[:3, 2])
        if abs((point - slice_to_ras[:3, 3]) @ normal) <= tolerance_mm:
            found.append(node)
    return found[0] if len(found) == 1 else None


def slicing_axis(volume: VolumeArray, roi_nodes: Sequence = (), line_nodes: Sequence = (),
                 axis: int | None = None) -> int:
    """The IJK axis along which keyframes are slices.

    In order: the one axis of a single-slice volume; ``axis`` when given (e.g. the slice view the
    user works in); the axis along which the ROIs are flat (after ``flatten_roi`` or when drawn
    thin); the axis along which every line keeps one index; else the IJK axis closest to
    superior-inferior (axial slices).
    """
    size = volume.size_ijk
    single = [a for a in range(3) if size[a] == 1]
    if len(single) == 1:
        return single[0]
    if axis is not None:
        if axis not in (0, 1, 2):
            raise InputError(f"axis must be 0, 1 or 2, got {axis!r}")
        return int(axis)
    votes: dict[int, list[str]] = {}
    for roi in roi_nodes:
        flat = roi_flat_axis(roi, volume)
        if flat is not None:
            votes.setdefault(flat, []).append(_node_name(roi))
    if len(votes) > 1:
        detail = "; ".join(f"axis {a}: {', '.join(names)}" for a, names in sorted(votes.items()))
        raise InputError(f"the keyframe boxes lie in different slice orientations ({detail}); "
                         "draw all boxes of a segment in the same view")
    if votes:
        return next(iter(votes))
    line_axes = set()
    for line in line_nodes:
        ends = volume.world_to_ijk(line_points_world(line))
        constant = [a for a in range(3) if abs(ends[0, a] - ends[1, a]) < 0.5]
        if len(constant) == 1:
            line_axes.add(constant[0])
    if len(line_axes) == 1:
        return line_axes.pop()
    return int(np.argmax(np.abs(volume.direction_ras[2, :])))


def _slice_of(value: float, n: int, what: str) -> int:
    index = int(np.floor(value + 0.5))
    if not 0 <= index < n:
        raise InputError(f"{what} lies outside the volume (slice {index}; the volume has slices 0..{n - 1})")
    return index


def _inclusive_range(lo: float, hi: float, n: int, what: str) -> tuple[int, int]:
    """Voxels whose cells [x - 0.5, x + 0.5] the interval [lo, hi] overlaps, clipped to 0..n-1; at least 2 wide."""
    first = int(np.floor(lo + 0.5 + _EPS))
    last = int(np.ceil(hi - 0.5 - _EPS))
    if last < first:  # narrower than a voxel: the voxel holding its centre
        first = last = int(np.floor((lo + hi) / 2.0 + 0.5))
    if last < 0 or first > n - 1:
        raise InputError(f"{what} lies outside the image (voxels {first}..{last}; the image has 0..{n - 1})")
    first, last = max(first, 0), min(last, n - 1)
    if first == last:  # the model needs a box with area
        if n < 2:
            raise InputError(f"{what}: the image is one voxel wide along this direction; nothing to segment")
        first, last = (first, first + 1) if first + 1 < n else (first - 1, first)
    return first, last


def roi_keyframe(roi_node, volume: VolumeArray, axis: int) -> BoxKeyframe:
    """The slice and IJK box of a keyframe ROI, for any volume orientation (axial, coronal, sagittal, oblique).

    The slice is the one holding the ROI's centre; the box covers every voxel the ROI overlaps in-plane.
    """
    name = _node_name(roi_node)
    corners = volume.world_to_ijk(roi_corners_world(roi_node))
    size = volume.size_ijk
    centre = corners.mean(axis=0)
    index = _slice_of(centre[axis], size[axis], f"ROI '{name}'")
    u, v = in_plane_axes(axis)
    u0, u1 = _inclusive_range(corners[:, u].min(), corners[:, u].max(), size[u], f"ROI '{name}'")
    v0, v1 = _inclusive_range(corners[:, v].min(), corners[:, v].max(), size[v], f"ROI '{name}'")
    return BoxKeyframe(slice=index, box=(u0, v0, u1, v1), name=name)


def flatten_roi(roi_node, volume: VolumeArray, axis: int) -> BoxKeyframe:
    """Snap a keyframe ROI onto its slice: aligned with the volume's voxel grid, one voxel thick.

    The keyframe is what ``roi_keyframe`` reads, and reading the flattened ROI gives the same keyframe.
    """
    keyframe = roi_keyframe(roi_node, volume, axis)
    u, v = in_plane_axes(axis)
    u0, v0, u1, v1 = keyframe.box
    centre_ijk = np.zeros(3)
    centre_ijk[axis] = keyframe.slice
    centre_ijk[u], centre_ijk[v] = (u0 + u1) / 2.0, (v0 + v1) / 2.0
    voxels = np.ones(3)
    voxels[u], voxels[v] = u1 - u0 + 1, v1 - v0 + 1
    directions = volume.direction_ras.copy()
    if np.linalg.det(directions) < 0:
        directions[:, axis] *= -1.0  # an ROI's axes must be a rotation; a box is symmetric along its depth anyway
    object_to_world = np.eye(4)
    object_to_world[:3, :3] = directions
    object_to_world[:3, 3] = volume.ijk_to_world[:3, :3] @ centre_ijk + volume.ijk_to_world[:3, 3]
    object_to_node = np.linalg.inv(node_to_world(roi_node)) @ object_to_world
    was_modifying = roi_node.StartModify()
    try:
        roi_node.SetAndObserveObjectToNodeMatrix(vtk_matrix_from_array(object_to_node))
        roi_node.SetSize(*(voxels * np.array(volume.spacing)))
    finally:
        roi_node.EndModify(was_modifying)
    return keyframe


def line_keyframe(line_node, volume: VolumeArray, axis: int) -> LineKeyframe:
    """A RECIST axis (markups line) as a line on its slice; both ends must lie on the same slice."""
    name = _node_name(line_node)
    ends = volume.world_to_ijk(line_points_world(line_node))
    size = volume.size_ijk
    if abs(ends[0, axis] - ends[1, axis]) > 0.5 + _EPS:
        raise InputError(f"line '{name}' crosses slices {ends[0, axis]:.1f} to {ends[1, axis]:.1f}; "
                         "draw each RECIST axis within one slice")
    index = _slice_of(ends[:, axis].mean(), size[axis], f"line '{name}'")
    u, v = in_plane_axes(axis)
    limits = np.array([size[u] - 1.0, size[v] - 1.0])
    points = np.clip(ends[:, [u, v]], 0.0, limits)
    if np.allclose(points[0], points[1]):
        raise InputError(f"line '{name}' has no length inside the image")
    rounded = tuple(tuple(round(float(c), 3) for c in p) for p in points)
    return LineKeyframe(slice=index, points=rounded, name=name)


def lines_bounding_box(lines: Sequence[LineKeyframe]) -> tuple[int, int, int, int]:
    """The inclusive voxel box enclosing the end points of lines on one slice (no margin; the server adds one)."""
    points = np.array([p for line in lines for p in line.points], dtype=np.float64)
    lo = np.floor(points.min(axis=0) + 0.5).astype(int)
    hi = np.floor(points.max(axis=0) + 0.5).astype(int)
    return int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1])


def prompt_document(axis: int, boxes: Sequence[BoxKeyframe] = (), lines: Sequence[LineKeyframe] = (),
                    segment_name: str = "segment", window: Any = "auto", locked_slices: Sequence[int] = (),
                    label: int = 1) -> dict:
    """The prompt document of DESIGN.md section 4 for one segment.

    One keyframe per slice: two boxes, or a box and lines, on one slice are an error naming both markups.
    """
    if not boxes and not lines:
        raise InputError(f"segment '{segment_name}' has no keyframes: add a box (or RECIST lines) first")
    by_slice: dict[int, BoxKeyframe] = {}
    for keyframe in boxes:
        if keyframe.slice in by_slice:
            raise InputError(f"'{by_slice[keyframe.slice].name}' and '{keyframe.name}' are both on slice "
                             f"{keyframe.slice}; keep one box per slice")
        by_slice[keyframe.slice] = keyframe
    for line in lines:
        if line.slice in by_slice:
            raise InputError(f"slice {line.slice} has the box '{by_slice[line.slice].name}' and the line "
                             f"'{line.name}'; keep one kind of keyframe per slice")
    if not (isinstance(window, str) and window in WINDOWS) and not (
            isinstance(window, (list, tuple)) and len(window) == 2):
        raise InputError(f"window must be one of {', '.join(WINDOWS)} or [low, high], got {window!r}")
    segment: dict[str, Any] = {"name": segment_name or "segment", "label": int(label)}
    if boxes:
        segment["boxes"] = [{"slice": k.slice, "box": [int(c) for c in k.box]} for k in sorted(boxes, key=_by_slice)]
    if lines:
        segment["lines"] = [{"slice": k.slice, "points": [list(p) for p in k.points]}
                            for k in sorted(lines, key=_by_slice)]
    locked = sorted({int(s) for s in locked_slices})
    if locked:
        segment["locked_slices"] = locked
    return {"axis": int(axis), "window": list(window) if isinstance(window, tuple) else window,
            "segments": [segment]}


def _by_slice(keyframe) -> int:
    return keyframe.slice


def keyframe_tag(segmentation_node, segment_id: str) -> str:
    return f"{segmentation_node.GetID()}|{segment_id}"


def tag_keyframe(markups_node, segmentation_node, segment_id: str) -> None:
    """Mark a ROI or line node as a keyframe of one segment (the tag is saved with the scene)."""
    markups_node.SetAttribute(KEYFRAME_ATTRIBUTE, keyframe_tag(segmentation_node, segment_id))


def keyframe_nodes(segmentation_node, segment_id: str) -> tuple[list, list]:
    """The (ROI nodes, line nodes) tagged as keyframes of a segment, in scene order."""
    scene = segmentation_node.GetScene()
    tag = keyframe_tag(segmentation_node, segment_id)
    found: dict[str, list] = {"vtkMRMLMarkupsROINode": [], "vtkMRMLMarkupsLineNode": []}
    for class_name, nodes in found.items():
        collection = scene.GetNodesByClass(class_name)
        for n in range(collection.GetNumberOfItems()):
            node = collection.GetItemAsObject(n)
            if node.GetAttribute(KEYFRAME_ATTRIBUTE) == tag:
                nodes.append(node)
    return found["vtkMRMLMarkupsROINode"], found["vtkMRMLMarkupsLineNode"]


# ------------------------------------------------------------------------------------------------ segments


def _segment(segmentation_node, segment_id: str):
    if segmentation_node is None:
        raise InputError("select a segmentation first")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None
    if segment is None:
        raise InputError(f"segmentation '{_node_name(segmentation_node)}' has no segment '{segment_id}'; "
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
    segment = _segment(segmentation_node, segment_id)
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
    segment = _segment(segmentation_node, segment_id)
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
    segment = _segment(segmentation_node, segment_id)
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
    return AppliedRun(changed_slices=changed, locked_slices=locked, voxels=voxels)


# ------------------------------------------------------------------------------------------------ a run


@dataclass
class RunRequest:
    """Everything a run needs, detached from MRML: made on the main thread, sent from a worker."""

    volume: VolumeArray
    document: dict
    axis: int
    segment_id: str
    locked_slices: list[int]
    existing: np.ndarray | None  # (k, j, i) uint16, label 1 = the segment; sent when slices are locked
    keyframe_count: int
    keyframe_spacing: float | None  # mean slices between neighbouring keyframes
    volume_node_id: str = ""
    segmentation_node_id: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    session: Any
    ijk_offset: tuple[int, int, int]
    labels: np.ndarray  # (k, j, i) block; (0, 0, 0) when the run changed nothing
    seconds: float  # wall time of upload (if any) and annotate, as the client saw it
    summary: dict = field(default_factory=dict)  # the server's report: per segment, seconds, cache, notes

    @property
    def server_seconds(self) -> float | None:
        """The server's own compute time (embedding + decoding), when it reports it."""
        seconds = self.summary.get("seconds") if isinstance(self.summary, dict) else None
        if isinstance(seconds, dict) and seconds:
            return float(sum(float(v) for v in seconds.values()))
        return None


def prepare_run(volume_node, segmentation_node, segment_id: str, roi_nodes: Sequence | None = None,
                line_nodes: Sequence | None = None, window: Any = "auto", axis: int | None = None,
                flatten: bool = True) -> RunRequest:
    """Read volume, keyframes and hand edits into a :class:`RunRequest` (main thread).

    Keyframes default to the markups tagged for the segment (``keyframe_nodes``). ``flatten`` snaps
    each ROI onto its slice so that what the user sees is what is sent.
    """
    segment = _segment(segmentation_node, segment_id)
    if roi_nodes is None and line_nodes is None:
        roi_nodes, line_nodes = keyframe_nodes(segmentation_node, segment_id)
    roi_nodes, line_nodes = list(roi_nodes or ()), list(line_nodes or ())
    volume = volume_array(volume_node)
    axis = slicing_axis(volume, roi_nodes, line_nodes, axis)
    boxes = [(flatten_roi if flatten else roi_keyframe)(roi, volume, axis) for roi in roi_nodes]
    lines = [line_keyframe(line, volume, axis) for line in line_nodes]
    current = segment_array(segmentation_node, segment_id, volume_node)
    locked = edited_slices(segmentation_node, segment_id, volume_node, axis, current)
    document = prompt_document(axis, boxes, lines, segment.GetName(), window, locked)
    existing = current.astype(np.uint16) if locked else None
    slices = sorted({k.slice for k in boxes} | {k.slice for k in lines})
    spacing = float(np.mean(np.diff(slices))) if len(slices) > 1 else None
    return RunRequest(volume=volume, document=document, axis=axis, segment_id=segment_id, locked_slices=locked,
                      existing=existing, keyframe_count=len(slices), keyframe_spacing=spacing,
                      volume_node_id=volume_node.GetID() or "", segmentation_node_id=segmentation_node.GetID() or "",
                      notes=list(volume.notes))


def upload(client, volume: VolumeArray):
    """Upload a volume (``MedSAMClient.upload_volume``: spacing (i, j, k), origin and direction LPS); a session."""
    return client.upload_volume(volume.array, volume.spacing, origin=volume.origin_lps, direction=volume.direction_lps)


def execute_run(client, request: RunRequest, session: Any = None, progress: Callable | None = None,
                cancel: Any = None) -> RunResult:
    """Upload the volume (unless ``session`` is given) and run the prompt document on the server.

    Touches no MRML, so it may run in a worker thread. Exceptions (server errors, cancellation)
    propagate; the caller then skips ``apply_run`` and the segmentation stays as it was.
    """
    start = time.perf_counter()
    if session is None:
        session = upload(client, request.volume)
    offset, labels, summary = client.annotate(session, request.document, existing=request.existing,
                                              progress=progress, cancel=cancel)
    return RunResult(session=session, ijk_offset=tuple(int(v) for v in offset), labels=np.asarray(labels),
                     seconds=time.perf_counter() - start, summary=dict(summary or {}))


def apply_run(request: RunRequest, result: RunResult, volume_node, segmentation_node,
              save_undo_state: Callable[[], Any] | None = None) -> AppliedRun:
    """Write a finished run into its segment (main thread); refuses if the nodes are not the request's."""
    if (volume_node.GetID() or "") != request.volume_node_id or \
            (segmentation_node.GetID() or "") != request.segmentation_node_id:
        raise InputError("the volume or segmentation changed while the run was going; run Segment again")
    if tuple(reversed(volume_node.GetImageData().GetDimensions())) != request.volume.array.shape[:3]:
        raise InputError("the volume's size changed while the run was going; run Segment again")
    label = int(request.document["segments"][0]["label"])
    return apply_labels(volume_node, segmentation_node, request.segment_id, result.ijk_offset, result.labels,
                        label=label, axis=request.axis, locked_slices=request.locked_slices,
                        save_undo_state=save_undo_state)


def run_segmentation(client, volume_node, segmentation_node, segment_id: str, *, roi_nodes=None, line_nodes=None,
                     window: Any = "auto", axis: int | None = None, session: Any = None,
                     progress: Callable | None = None, cancel: Any = None,
                     save_undo_state: Callable[[], Any] | None = None) -> tuple[AppliedRun, RunResult]:
    """``prepare_run`` + ``execute_run`` + ``apply_run`` in one blocking call (scripts and tests)."""
    request = prepare_run(volume_node, segmentation_node, segment_id, roi_nodes, line_nodes, window, axis)
    result = execute_run(client, request, session=session, progress=progress, cancel=cancel)
    return apply_run(request, result, volume_node, segmentation_node, save_undo_state), result


# ------------------------------------------------------------------------------------------------ local server


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class LocalServer:
    """``medsam serve`` as a child process on 127.0.0.1 with a random token.

    ``python`` is the interpreter that has ``medsam_server`` (Slicer's ``PythonSlicer``); the token is
    written to a private file that the server reads, so it never shows in a process list.
    """

    def __init__(self, python: str | None = None, port: int = 0, extra_args: Sequence[str] = (),
                 log_path: str | None = None) -> None:
        self.python = python or sys.executable
        self.port = port
        self.extra_args = list(extra_args)
        self.log_path = log_path
        self.token = ""
        self.url = ""
        self.process: subprocess.Popen | None = None
        self._folder: tempfile.TemporaryDirectory | None = None
        self._log = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> tuple[str, str]:
        """Start the server unless it runs; returns (url, token). Does not wait for it to answer."""
        if self.running:
            return self.url, self.token
        self.stop()
        self._folder = tempfile.TemporaryDirectory(prefix="medsam-slicer-")
        self.token = secrets.token_urlsafe(32)
        token_file = os.path.join(self._folder.name, "token")
        descriptor = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(self.token)
        port = self.port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = self.log_path or os.path.join(self._folder.name, "server.log")
        self._log = open(self.log_path, "ab")
        command = [self.python, "-m", "medsam_server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--token-file", token_file, *self.extra_args]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self.url, self.token

    def log_tail(self, characters: int = 2000) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(self.log_path) - characters))
            return handle.read().decode("utf-8", "replace")

    def wait_ready(self, probe: Callable[[], Any], timeout: float = 120.0, cancel: Any = None) -> None:
        """Call ``probe`` (e.g. ``client.info``) until it succeeds; raise with the server's log if it died."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise RuntimeError(f"the local MedSAM server stopped during start-up:\n{self.log_tail()}")
            try:
                return probe()
            except Exception as error:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the local MedSAM server did not answer within {timeout:.0f} s: {error}\n"
                                       f"{self.log_tail()}") from error
            if cancel is not None and cancel.is_set():
                raise RuntimeError("cancelled while the local server was starting")
            time.sleep(0.25)

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None
