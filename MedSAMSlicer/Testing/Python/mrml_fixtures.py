"""Small builders of MRML test scenes shared by the headless tests (imported by them; not a test)."""

from __future__ import annotations

import numpy as np


def add_segmentation(scene, volume_node, names=("target",)):
    """A segmentation node whose geometry follows the volume, with empty segments; returns (node, [ids])."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    ids = [node.GetSegmentation().AddEmptySegment(name, name) for name in names]
    return node, ids


def add_roi(scene, centre_ras, size, name="box", object_to_world=None):
    """A markups ROI with its centre and size in RAS millimetres (optionally rotated by a 3x3 matrix)."""
    from MedSAMSlicerLib import geometry

    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    matrix = np.eye(4)
    if object_to_world is not None:
        matrix[:3, :3] = object_to_world
    matrix[:3, 3] = centre_ras
    roi.SetAndObserveObjectToNodeMatrix(geometry.vtk_matrix_from_array(matrix))
    roi.SetSize(*size)
    return roi


def add_line(scene, start_ras, end_ras, name="line"):
    line = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", name)
    line.AddControlPoint(*[float(v) for v in start_ras])
    line.AddControlPoint(*[float(v) for v in end_ras])
    return line


def ijk_to_ras_point(volume_node, ijk):
    """One IJK point -> RAS through MRML's own matrix (an independent path from the logic's)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array(matrix.MultiplyPoint([float(v) for v in ijk] + [1.0])[:3])


def paint(segmentation_node, segment_id, volume_node, k, rows, cols, value=1):
    """A hand edit on slice k as the Segment Editor's Paint (``value`` 1) or Erase (0) makes it, not through the Lib."""
    import slicer
    import vtk
    import vtk.util.numpy_support

    ni, nj, _ = volume_node.GetImageData().GetDimensions()
    modifier = slicer.vtkOrientedImageData()
    modifier.SetExtent(0, ni - 1, 0, nj - 1, k, k)
    modifier.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    plane = vtk.util.numpy_support.vtk_to_numpy(modifier.GetPointData().GetScalars()).reshape(nj, ni)
    plane[:] = 0
    plane[rows, cols] = 1
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    modifier.SetImageToWorldMatrix(matrix)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if value:
        mode = logic.MODE_MERGE_MASK
    else:  # erase: keep everything but the painted voxels
        plane[:] = 1 - plane
        mode = logic.MODE_MERGE_MIN
    assert logic.SetBinaryLabelmapToSegment(modifier, segmentation_node, segment_id, mode, modifier.GetExtent())
