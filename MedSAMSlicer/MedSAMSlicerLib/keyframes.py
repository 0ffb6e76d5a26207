"""Markups -> keyframes: ROI boxes and RECIST lines on slices, the prompt document, which markups belong to a segment.

A keyframe is a markups ROI (a box) or line (a RECIST axis) on one slice of the source volume, in the
slice-pixel frame of ``geometry`` (a box is ``[u_min, v_min, u_max, v_max]``, inclusive voxel indices).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError
from .geometry import (
    VolumeArray,
    array_from_vtk_matrix,
    in_plane_axes,
    node_name,
    node_to_world,
    vtk_matrix_from_array,
)
from .protocol import WINDOW_NAMES

KEYFRAME_ATTRIBUTE = "MedSAMSlicer.Keyframe"  # on a markups node: "<segmentation node ID>|<segment ID>"
_EPS = 1e-6

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
        raise InputError(f"ROI '{node_name(roi_node)}' is not placed yet: draw it in a slice view")
    object_to_world = array_from_vtk_matrix(roi_node.GetObjectToWorldMatrix())
    half = np.array(roi_node.GetSize(), dtype=np.float64) / 2.0
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    corners = signs * half
    return corners @ object_to_world[:3, :3].T + object_to_world[:3, 3]


def line_points_world(line_node) -> np.ndarray:
    """(2, 3) RAS end points of a markups line."""
    if line_node.GetNumberOfControlPoints() < 2:
        raise InputError(f"line '{node_name(line_node)}' needs two points: finish drawing it")
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
            votes.setdefault(flat, []).append(node_name(roi))
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
    name = node_name(roi_node)
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
    name = node_name(line_node)
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
    if not (isinstance(window, str) and window in WINDOW_NAMES) and not (
            isinstance(window, (list, tuple)) and len(window) == 2):
        raise InputError(f"window must be one of {', '.join(WINDOW_NAMES)} or [low, high], got {window!r}")
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

