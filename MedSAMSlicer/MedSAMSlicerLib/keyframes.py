"""Markups -> keyframes: ROI boxes and RECIST lines on slices, the prompt document, which markups belong to a segment.

A keyframe is a markups ROI (a box) or line (a RECIST axis) on one slice of the source volume, in the
slice-pixel frame of ``geometry`` (a box is ``[u_min, v_min, u_max, v_max]``, inclusive voxel indices).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import vtk

from .errors import InputError
from .geometry import (
    VolumeArray,
    array_from_vtk_matrix,
    grid_axis,
    in_plane_axes,
    node_name,
    node_to_world,
    vtk_matrix_from_array,
)
from .protocol import WINDOW_NAMES

SEGMENTATION_ROLE = "MedSAMSlicer.Segmentation"  # node reference: keyframe markup -> its segmentation node
SEGMENT_ATTRIBUTE = "MedSAMSlicer.SegmentID"  # the segment's ID, which a rename does not change
VIEW_ROLE = "MedSAMSlicer.PlacedInView"  # node reference: keyframe markup -> the slice view it was drawn in
NORMAL_ATTRIBUTE = "MedSAMSlicer.PlacementNormal"  # that view's normal (RAS) as it was when drawn: "x y z"
MARKUP_CLASSES = ("vtkMRMLMarkupsROINode", "vtkMRMLMarkupsLineNode")
OBLIQUE_TOLERANCE_DEGREES = 1.0  # a box's edges may be this far off the voxel grid (< 1 voxel over 50)
OBLIQUE_FIX = ("rotate the slice view to the volume (slice view menu: Rotate to volume plane) and draw it again, "
               "or resample the volume into the view's orientation first")
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


# ------------------------------------------------------------------------------------------------ placement


def record_placement(markups_node, crosshair_node):
    """Remember the slice view a markup is being drawn in: the view under the mouse at its first click.

    Call when the first control point is placed. Keeps the view (a node reference) and its normal at that
    moment (the view may be rotated later) with the markup, saved with the scene. Returns the slice node,
    or None when it was placed elsewhere (a 3D view).
    """
    xyz = [0.0, 0.0, 0.0]
    view = crosshair_node.GetCursorPositionXYZ(xyz) if crosshair_node is not None else None
    if view is None or not view.IsA("vtkMRMLSliceNode"):
        return None
    normal = array_from_vtk_matrix(view.GetSliceToRAS())[:3, 2]
    markups_node.SetNodeReferenceID(VIEW_ROLE, view.GetID())
    markups_node.SetAttribute(NORMAL_ATTRIBUTE, " ".join(f"{v:.9g}" for v in normal / np.linalg.norm(normal)))
    return view


def placement_normal(markups_node) -> np.ndarray | None:
    """The RAS normal of the view a markup was drawn in, when ``record_placement`` saw it."""
    text = markups_node.GetAttribute(NORMAL_ATTRIBUTE)
    try:
        normal = np.array([float(v) for v in text.split()]) if text else None
    except ValueError:
        return None
    return normal if normal is not None and normal.shape == (3,) and np.linalg.norm(normal) > 0 else None


def placement_view_name(markups_node) -> str:
    view = markups_node.GetNodeReference(VIEW_ROLE)
    return (view.GetLayoutName() or view.GetName()) if view is not None else ""


def placement_problem(markups_node) -> str:
    """Why a markup is not a keyframe as drawn (incomplete or degenerate), in words for the status line; "" if it is."""
    name = node_name(markups_node)
    if markups_node.IsA("vtkMRMLMarkupsROINode"):
        if markups_node.GetNumberOfDefinedControlPoints() < 1:
            return f"box '{name}' was not placed"
        extents = sorted(float(v) for v in markups_node.GetSize())
        if extents[1] <= _EPS:  # one click leaves a point; two on the same spot a line at most
            return f"box '{name}' was left after its first corner: draw a box with two clicks (opposite corners)"
        return ""
    if markups_node.GetNumberOfDefinedControlPoints() < 2:
        return f"line '{name}' was left after its first end: click both ends of the axis"
    ends = line_points_world(markups_node)
    if np.linalg.norm(ends[1] - ends[0]) <= _EPS:
        return f"line '{name}' has both ends on one point"
    return ""


def _placement_axis(markups_node, volume: VolumeArray) -> int | None:
    """The voxel axis of the view a markup was drawn in; InputError if that view is oblique to the voxel grid."""
    normal = placement_normal(markups_node)
    if normal is None:
        return None
    axis, degrees = grid_axis(normal, volume)
    if degrees > OBLIQUE_TOLERANCE_DEGREES:
        view = placement_view_name(markups_node) or "slice"
        raise InputError(f"'{node_name(markups_node)}' was drawn in the {view} view, which is {degrees:.1f} degrees "
                         f"off the volume's slices; MedSAM takes boxes on the volume's own slices: {OBLIQUE_FIX}")
    return axis


# ------------------------------------------------------------------------------------------------ geometry of markups


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


def _line_axis(line_node, volume: VolumeArray) -> int | None:
    ends = volume.world_to_ijk(line_points_world(line_node))
    constant = [a for a in range(3) if abs(ends[0, a] - ends[1, a]) < 0.5]
    return constant[0] if len(constant) == 1 else None


def marker_axis(markups_node, volume: VolumeArray) -> int | None:
    """The voxel axis of a keyframe's slice: the view it was drawn in when recorded, else its own shape."""
    axis = _placement_axis(markups_node, volume)
    if axis is not None:
        return axis
    if markups_node.IsA("vtkMRMLMarkupsROINode"):
        return roi_flat_axis(markups_node, volume)
    return _line_axis(markups_node, volume)


def slicing_axis(volume: VolumeArray, roi_nodes: Sequence = (), line_nodes: Sequence = (),
                 axis: int | None = None) -> int:
    """The IJK axis along which keyframes are slices.

    In order: the one axis of a single-slice volume; ``axis`` when given; the axis of the view the
    markups were drawn in (recorded at placement) or, for markups without that record, the axis along
    which an ROI is flat or a line keeps one index; else the IJK axis closest to superior-inferior (axial).
    Markups of one segment in different orientations are an error naming them.
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
    for node in [*roi_nodes, *line_nodes]:
        found = marker_axis(node, volume)
        if found is not None:
            votes.setdefault(found, []).append(node_name(node))
    if len(votes) > 1:
        detail = "; ".join(f"axis {a}: {', '.join(names)}" for a, names in sorted(votes.items()))
        raise InputError(f"the keyframes lie in different slice orientations ({detail}); "
                         "draw all keyframes of a segment in the same view")
    if votes:
        return next(iter(votes))
    return int(np.argmax(np.abs(volume.direction_ras[2, :])))


def _slice_of(value: float, n: int, what: str) -> int:
    index = int(np.floor(value + 0.5))
    if not 0 <= index < n:
        raise InputError(f"{what} lies outside the volume (slice {index}; the volume has slices 0..{n - 1})")
    return index


def _inclusive_range(lo: float, hi: float, n: int, what: str) -> tuple[int, int]:
    """Voxels whose cells [x - 0.5, x + 0.5] the interval [lo, hi] overlaps, clipped to 0..n-1."""
    first = int(np.floor(lo + 0.5 + _EPS))
    last = int(np.ceil(hi - 0.5 - _EPS))
    if last < first:  # narrower than a voxel: the voxel holding its centre
        first = last = int(np.floor((lo + hi) / 2.0 + 0.5))
    if last < 0 or first > n - 1:
        raise InputError(f"{what} lies outside the image (voxels {first}..{last}; the image has 0..{n - 1})")
    # One voxel wide is a valid box: indices are inclusive, as the server's box check takes them.
    return max(first, 0), min(last, n - 1)


def _check_in_plane_alignment(roi_node, volume: VolumeArray, axis: int) -> None:
    """A box is a rectangle of voxels: the ROI's two in-plane edges must run along the slice's voxel rows and
    columns. A rotated ROI's axis-aligned bounds would be a bigger box than the one drawn, so it is refused."""
    object_to_world = array_from_vtk_matrix(roi_node.GetObjectToWorldMatrix())[:3, :3]
    found = [grid_axis(object_to_world[:, n], volume) for n in range(3)]
    depth = int(np.argmin([degrees if a == axis else 180.0 for a, degrees in found]))
    in_plane = [found[n] for n in range(3) if n != depth]
    worst = max(degrees for _, degrees in in_plane)
    if found[depth][0] != axis or {a for a, _ in in_plane} != set(in_plane_axes(axis)) or \
            worst > OBLIQUE_TOLERANCE_DEGREES:
        raise InputError(f"box '{node_name(roi_node)}' is rotated {worst:.1f} degrees to the voxel grid of the "
                         f"volume's slices, so no box of voxels matches it: {OBLIQUE_FIX}")


def roi_keyframe(roi_node, volume: VolumeArray, axis: int) -> BoxKeyframe:
    """The slice and IJK box of a keyframe ROI, for any volume orientation (axial, coronal, sagittal, oblique).

    The slice is the one holding the ROI's centre; the box covers every voxel the ROI overlaps in-plane.
    The ROI's edges must follow the slice's voxel grid (``OBLIQUE_TOLERANCE_DEGREES``); an incomplete
    ROI (one click) or one rotated to the grid is refused with what to do.
    """
    problem = placement_problem(roi_node)
    if problem:
        raise InputError(problem)
    _check_in_plane_alignment(roi_node, volume, axis)
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
    problem = placement_problem(line_node)
    if problem:
        raise InputError(problem)
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


def prompt_document(axis: int, boxes: Sequence[BoxKeyframe] = (), lines: Sequence[LineKeyframe] = (),
                    segment_name: str = "segment", window: Any = "auto", locked_slices: Sequence[int] = (),
                    label: int = 1) -> dict:
    """The prompt document (README "The command line") for one segment.

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


def tag_keyframe(markups_node, segmentation_node, segment_id: str) -> None:
    """Make a ROI or line node a keyframe of one segment: a node reference to the segmentation (kept through
    scene save, load and import, where node IDs change) and the segment's ID (kept through renames)."""
    markups_node.SetNodeReferenceID(SEGMENTATION_ROLE, segmentation_node.GetID())
    markups_node.SetAttribute(SEGMENT_ATTRIBUTE, segment_id)


def keyframe_nodes(segmentation_node, segment_id: str) -> tuple[list, list]:
    """The (ROI nodes, line nodes) that are keyframes of a segment, in scene order."""
    scene = segmentation_node.GetScene()
    found: dict[str, list] = {name: [] for name in MARKUP_CLASSES}
    for class_name, nodes in found.items():
        collection = scene.GetNodesByClass(class_name)
        for n in range(collection.GetNumberOfItems()):
            node = collection.GetItemAsObject(n)
            if node.GetNodeReference(SEGMENTATION_ROLE) is segmentation_node and \
                    node.GetAttribute(SEGMENT_ATTRIBUTE) == segment_id:
                nodes.append(node)
    return found["vtkMRMLMarkupsROINode"], found["vtkMRMLMarkupsLineNode"]


@dataclass(frozen=True)
class TableRow:
    """One line of the panel's keyframe table: the slice (None when unknown), what the prompt is, its problem."""

    slice: int | None
    prompt: str
    node: Any
    problem: str = ""


def table_rows(volume: VolumeArray | None, roi_nodes: Sequence, line_nodes: Sequence) -> list[TableRow]:
    """The keyframe table of a segment, by slice: each markup read as ``prepare_run`` will read it, or why not."""
    nodes = [*roi_nodes, *line_nodes]
    if volume is None:
        return [TableRow(None, "", node, "select the volume first") for node in nodes]
    try:
        axis, shared = slicing_axis(volume, roi_nodes, line_nodes), ""
    except InputError as error:  # e.g. an oblique view or mixed orientations: every row says so
        axis, shared = None, str(error)
    rows = []
    for node in nodes:
        try:
            if shared:
                raise InputError(shared)
            if node.IsA("vtkMRMLMarkupsROINode"):
                box = roi_keyframe(node, volume, axis)
                rows.append(TableRow(box.slice, "box {} {} - {} {}".format(*box.box), node))
            else:
                rows.append(TableRow(line_keyframe(node, volume, axis).slice, "line", node))
        except InputError as error:
            rows.append(TableRow(None, "", node, str(error)))
    return sorted(rows, key=lambda row: (row.slice is None, row.slice or 0, node_name(row.node)))


def finish_placement(markups_node, volume: VolumeArray) -> tuple[BoxKeyframe | LineKeyframe | None, str]:
    """After the user stops drawing a keyframe: (keyframe, status text).

    An incomplete or degenerate markup is removed from the scene (it was never a keyframe) and the text says
    so. A box is snapped onto its slice (``flatten_roi``). A markup that cannot be used as drawn (an oblique
    view, outside the image) stays for the user to fix, and the text says what is wrong.
    """
    problem = placement_problem(markups_node)
    if problem:
        markups_node.GetScene().RemoveNode(markups_node)
        return None, f"{problem[0].upper()}{problem[1:]}; it was removed."
    try:
        axis = slicing_axis(volume, [markups_node] if markups_node.IsA("vtkMRMLMarkupsROINode") else [],
                            [markups_node] if markups_node.IsA("vtkMRMLMarkupsLineNode") else [])
        if markups_node.IsA("vtkMRMLMarkupsROINode"):
            keyframe = flatten_roi(markups_node, volume, axis)
            return keyframe, f"Box on slice {keyframe.slice}."
        keyframe = line_keyframe(markups_node, volume, axis)
        return keyframe, f"Line on slice {keyframe.slice}."
    except InputError as error:
        return None, f"Not usable as a keyframe: {error}"


class KeyframeObserver:
    """Calls ``on_change()`` when a keyframe markup is added, removed, moved, or finishes an interaction.

    Observes the scene and every ROI and line markup in it between ``start()`` and ``stop()`` (the module
    starts it when shown and stops it when hidden). ``on_change`` should be cheap (e.g. start a timer).
    """

    POINT_EVENTS = ("PointAddedEvent", "PointRemovedEvent", "PointModifiedEvent", "PointEndInteractionEvent",
                    "PointPositionDefinedEvent", "TransformModifiedEvent")

    def __init__(self, scene, on_change) -> None:
        self.scene = scene
        self.on_change = on_change
        self._tags: list[tuple[Any, int]] = []
        self._watched: set[str] = set()

    @property
    def started(self) -> bool:
        return bool(self._tags)

    def start(self) -> None:
        if self.started:
            return
        self._tags.append((self.scene, self.scene.AddObserver(self.scene.NodeAddedEvent, self._on_added)))
        self._tags.append((self.scene, self.scene.AddObserver(self.scene.NodeRemovedEvent, self._on_removed)))
        for class_name in MARKUP_CLASSES:
            collection = self.scene.GetNodesByClass(class_name)
            for n in range(collection.GetNumberOfItems()):
                self._watch(collection.GetItemAsObject(n))

    def stop(self) -> None:
        for obj, tag in self._tags:
            obj.RemoveObserver(tag)
        self._tags, self._watched = [], set()

    def _watch(self, node) -> None:
        if node.GetID() in self._watched:
            return
        self._watched.add(node.GetID())
        for event in self.POINT_EVENTS:
            self._tags.append((node, node.AddObserver(getattr(node, event), self._on_markup)))

    @staticmethod
    def _is_markup(node) -> bool:
        return node is not None and any(node.IsA(name) for name in MARKUP_CLASSES)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _on_added(self, caller, event, node=None) -> None:
        if self._is_markup(node):
            self._watch(node)
            self.on_change()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _on_removed(self, caller, event, node=None) -> None:
        if self._is_markup(node):
            self._watched.discard(node.GetID())
            self._tags = [(obj, tag) for obj, tag in self._tags if obj is not node]
            self.on_change()

    def _on_markup(self, caller, event) -> None:
        self.on_change()
