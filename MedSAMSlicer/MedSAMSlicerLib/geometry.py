"""Volumes and frames: IJK <-> RAS, volumes detached from MRML, slice-view planes.

No qt and no torch: this runs inside Slicer and headless against the ``slicer-core`` wheel.

Frames
- *IJK*: voxel indices of the source volume, in the order SimpleITK's ``GetSize()`` reports them
  (i, j, k). Numpy arrays of a volume are ``(k, j, i)`` (``(k, j, i, 3)`` for RGB), as
  ``slicer.util.arrayFromVolume`` and SimpleITK's ``GetArrayFromImage`` give them.
- *world*: Slicer's RAS after all parent transforms. ``ijk_to_world`` is a 4x4 matrix; only
  linear parent transforms are supported (a warped volume must be hardened first).
- *slice pixels*: a slice taken along ``axis`` has columns along ``u`` and rows along ``v``,
  where (u, v) are the two other IJK axes in increasing order (the prompt document, README "The command
  line"). A box is ``[u_min, v_min, u_max, v_max]``, inclusive voxel indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import vtk
from vtk.util import numpy_support

from .errors import InputError

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

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


def node_name(node) -> str:
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
        raise InputError(f"volume '{node_name(volume_node)}' has no voxels (is it still loading?)")
    ni, nj, nk = image.GetDimensions()
    components = image.GetNumberOfScalarComponents()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    notes = []
    if components == 1:
        array = scalars.reshape(nk, nj, ni)
    elif components in (3, 4):
        array = scalars.reshape(nk, nj, ni, components)[..., :3]
        if components == 4:
            notes.append(f"volume '{node_name(volume_node)}' is RGBA: the alpha channel is not used")
    else:
        raise InputError(f"volume '{node_name(volume_node)}' has {components} components per voxel; "
                         "MedSAM reads grayscale (1) or colour (3) images")
    if copy:
        array = np.array(array, order="C")  # always a copy, contiguous
    else:
        array = array.view()
        array.flags.writeable = False
    return VolumeArray(array=array, ijk_to_world=ijk_to_world(volume_node), notes=notes)

def grid_axis(direction_world: Sequence[float], volume: VolumeArray) -> tuple[int, float]:
    """The voxel axis (0, 1, 2) closest to a world direction, and the angle between them in degrees."""
    direction = np.asarray(direction_world, dtype=np.float64)
    cosines = np.abs(direction / np.linalg.norm(direction) @ volume.direction_ras)
    axis = int(np.argmax(cosines))
    return axis, float(np.degrees(np.arccos(min(1.0, cosines[axis]))))

# ------------------------------------------------------------------------------------------------ slice views


def slice_centre_world(volume_node, axis: int, index: int) -> np.ndarray:
    """(3,) world (RAS) point at the centre of slice ``index`` along IJK ``axis``: where to jump the views."""
    size = volume_node.GetImageData().GetDimensions()
    u, v = in_plane_axes(axis)
    if not 0 <= int(index) < size[axis]:
        raise InputError(f"slice {index} is outside the volume's {size[axis]} slices along axis {axis}")
    centre = np.ones(4)
    centre[axis] = int(index)
    centre[u], centre[v] = (size[u] - 1) / 2.0, (size[v] - 1) / 2.0
    return (ijk_to_world(volume_node) @ centre)[:3]


def jump_to_slice(slice_nodes: Sequence, volume_node, axis: int, index: int) -> np.ndarray:
    """Move every slice view so that its plane passes through the centre of slice ``index`` (each view's own
    jump mode: offset or centre; oblique views too). Returns the world point."""
    point = slice_centre_world(volume_node, axis, index)
    for slice_node in slice_nodes:
        slice_node.JumpSlice(*(float(c) for c in point))
    return point


def view_slice(slice_node, volume_node, axis: int, tolerance_degrees: float = 1.0) -> int | None:
    """The slice along IJK ``axis`` that a slice view shows, or None when the view is not parallel to that
    slice (another orientation, an oblique view) or lies outside the volume."""
    slice_to_ras = array_from_vtk_matrix(slice_node.GetSliceToRAS())
    volume = VolumeArray(array=np.zeros((1, 1, 1)), ijk_to_world=ijk_to_world(volume_node))
    found, angle = grid_axis(slice_to_ras[:3, 2], volume)
    if found != axis or angle > tolerance_degrees:
        return None
    index = int(round(float(volume.world_to_ijk(slice_to_ras[:3, 3])[0, axis])))
    size = volume_node.GetImageData().GetDimensions()
    return index if 0 <= index < size[axis] else None
