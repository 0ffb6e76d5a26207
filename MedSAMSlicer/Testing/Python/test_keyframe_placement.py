"""Keyframes as the user places them, on real MRML: clicks, slice views with their own SliceToRAS, oblique volumes.

A click is what Slicer's markups widget does with it: the crosshair node learns the view under the mouse,
and the markup gets ``AddControlPointWorld`` at the clicked RAS position. The widget also orients a new ROI
to the view it is drawn in; that part of the GUI does not exist here, so ``draw_box`` sets that
orientation itself before the clicks.
"""

from __future__ import annotations

import numpy as np
import pytest

from mrml_fixtures import add_segmentation, ijk_to_ras_point

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402

from MedSAMSlicerLib import errors, geometry, keyframes  # noqa: E402

SIZE_IJK = (80, 70, 24)


def _rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def _volume(scene, directions=np.eye(3), spacing=(0.8, 0.8, 2.5)):
    matrix = np.eye(4)
    matrix[:3, :3] = directions * np.array(spacing)
    matrix[:3, 3] = (-30.0, -25.0, 10.0)
    return geometry.add_volume_node(scene, np.zeros(tuple(reversed(SIZE_IJK)), np.int16), matrix, "volume")


def _view(scene, name, normal, transverse, position=(0.0, 0.0, 0.0)):
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode", name)
    node.SetLayoutName(name)
    node.SetSliceToRASByNTP(*normal, *transverse, *position, 0)
    return node


@pytest.fixture
def views(scene):
    """Slicer's three views, Red axial, Yellow sagittal, Green coronal, and the crosshair that tracks the mouse."""
    return {"Red": _view(scene, "Red", (0, 0, 1), (-1, 0, 0)),
            "Yellow": _view(scene, "Yellow", (1, 0, 0), (0, -1, 0)),
            "Green": _view(scene, "Green", (0, 1, 0), (-1, 0, 0)),
            "crosshair": scene.AddNewNodeByClass("vtkMRMLCrosshairNode")}


def _click(views, view, node, ras):
    views["crosshair"].SetCursorPositionXYZ([10.0, 10.0, 0.0], views[view])
    if node.GetNumberOfControlPoints() == 0:  # the widget records the view at the first click
        keyframes.record_placement(node, views["crosshair"])
    node.AddControlPointWorld(vtk.vtkVector3d(*[float(c) for c in ras]))


def draw_box(scene, views, view, *corners_ras, name="box"):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    orientation = np.eye(4)
    orientation[:3, :3] = geometry.array_from_vtk_matrix(views[view].GetSliceToRAS())[:3, :3]
    roi.SetAndObserveObjectToNodeMatrix(geometry.vtk_matrix_from_array(orientation))
    for ras in corners_ras:
        _click(views, view, roi, ras)
    return roi


def _corners(volume_node, axis, index, box):
    """RAS of the two opposite outer corners of voxels ``box`` on slice ``index`` along ``axis``."""
    u, v = geometry.in_plane_axes(axis)
    low, high = np.zeros(3), np.zeros(3)
    low[axis] = high[axis] = index
    low[u], low[v], high[u], high[v] = box[0] - 0.5, box[1] - 0.5, box[2] + 0.5, box[3] + 0.5
    return ijk_to_ras_point(volume_node, low), ijk_to_ras_point(volume_node, high)


def test_one_click_is_no_keyframe_and_is_removed(scene, views):
    volume_node = _volume(scene)
    volume = geometry.volume_array(volume_node, copy=False)
    roi = draw_box(scene, views, "Red", _corners(volume_node, 2, 9, (10, 10, 30, 30))[0], name="abandoned")
    assert roi.GetNumberOfDefinedControlPoints() == 1  # what the old rule took for a placed box
    keyframe, status = keyframes.finish_placement(roi, volume)
    assert keyframe is None and "abandoned' was left after its first corner" in status and "removed" in status
    assert roi.GetScene() is None and scene.GetFirstNodeByName("abandoned") is None

    line = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", "half line")
    _click(views, "Red", line, ijk_to_ras_point(volume_node, (5, 5, 9)))
    keyframe, status = keyframes.finish_placement(line, volume)
    assert keyframe is None and "half line' was left after its first end" in status
    assert line.GetScene() is None

    same_spot = ijk_to_ras_point(volume_node, (12, 12, 9))
    roi = draw_box(scene, views, "Red", same_spot, same_spot, name="zero")
    assert keyframes.finish_placement(roi, volume)[0] is None and roi.GetScene() is None


def test_two_clicks_make_the_box_that_was_drawn(scene, views):
    volume_node = _volume(scene)
    volume = geometry.volume_array(volume_node, copy=False)
    roi = draw_box(scene, views, "Red", *_corners(volume_node, 2, 9, (10, 12, 59, 61)))
    keyframe, status = keyframes.finish_placement(roi, volume)
    assert (keyframe.slice, keyframe.box) == (9, (10, 12, 59, 61)) and status == "Box on slice 9."
    assert keyframes.placement_view_name(roi) == "Red"
    assert roi.GetNodeReference(keyframes.VIEW_ROLE) is views["Red"]


def test_the_view_it_was_drawn_in_decides_the_axis_not_the_views_that_cross_it(scene, views):
    """Linked views: the Red plane runs through the box drawn in Yellow; the box is still sagittal."""
    volume_node = _volume(scene)
    volume = geometry.volume_array(volume_node, copy=False)
    corner_a, corner_b = _corners(volume_node, 0, 40, (8, 6, 50, 18))  # sagittal slice i = 40, box in (j, k)
    views["Red"].SetSliceToRASByNTP(0, 0, 1, -1, 0, 0, *((corner_a + corner_b) / 2), 0)
    roi = draw_box(scene, views, "Yellow", corner_a, corner_b, name="sagittal box")
    assert keyframes.marker_axis(roi, volume) == 0
    keyframe, _ = keyframes.finish_placement(roi, volume)
    assert (keyframe.slice, keyframe.box) == (40, (8, 6, 50, 18))
    views["Yellow"].SetSliceToRASByNTP(0, 0, 1, -1, 0, 0, 0, 0, 0, 0)  # the view turned axial later ...
    assert keyframes.marker_axis(roi, volume) == 0  # ... the box keeps the orientation it was drawn in


def test_a_view_rotated_to_an_oblique_volume_gives_the_exact_box(scene, views):
    """A volume turned 20 degrees about S, the Red view rotated to it ("Rotate to volume plane"): a 50 x 50 voxel
    box stays 50 x 50 (the bounds of the rotated ROI would be about 64 x 64)."""
    directions = _rotation("z", 20)
    volume_node = _volume(scene, directions)
    volume = geometry.volume_array(volume_node, copy=False)
    views["Red"].SetSliceToRASByNTP(*directions[:, 2], *-directions[:, 0], 0, 0, 0, 0)
    roi = draw_box(scene, views, "Red", *_corners(volume_node, 2, 11, (12, 8, 61, 57)))
    keyframe, _ = keyframes.finish_placement(roi, volume)
    assert (keyframe.slice, keyframe.box) == (11, (12, 8, 61, 57))


def test_an_axial_view_of_an_oblique_volume_is_refused_with_the_fix(scene, views):
    directions = _rotation("z", 20)
    volume_node = _volume(scene, directions)
    volume = geometry.volume_array(volume_node, copy=False)
    roi = draw_box(scene, views, "Red", *_corners(volume_node, 2, 11, (12, 8, 61, 57)), name="in red")
    keyframe, status = keyframes.finish_placement(roi, volume)
    assert keyframe is None and "rotated 20.0 degrees" in status and "Rotate to volume plane" in status
    assert roi.GetScene() is scene  # what the user drew stays, to be fixed
    with pytest.raises(errors.InputError, match="rotated 20.0 degrees"):
        keyframes.roi_keyframe(roi, volume, 2)


def test_a_view_tilted_to_the_slices_is_refused(scene, views):
    """A gantry-tilted CT (slices 15 degrees off axial) in the plain axial Red view."""
    volume_node = _volume(scene, _rotation("x", 15))
    volume = geometry.volume_array(volume_node, copy=False)
    centre = ijk_to_ras_point(volume_node, (40, 35, 12))
    roi = draw_box(scene, views, "Red", centre - 10.0, centre + 10.0, name="tilted")
    with pytest.raises(errors.InputError, match="drawn in the Red view, which is 15.0 degrees off the volume's slices"):
        keyframes.marker_axis(roi, volume)


def test_keyframes_follow_their_segment_through_rename_and_scene_import(scene):
    volume_node = _volume(scene)
    node, (target,) = add_segmentation(scene, volume_node, ("liver",))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "liver box")
    keyframes.tag_keyframe(roi, node, target)
    node.GetSegmentation().GetSegment(target).SetName("liver (right lobe)")
    assert keyframes.keyframe_nodes(node, target) == ([roi], [])

    scene.SetSaveToXMLString(1)
    scene.Commit()
    saved = scene.GetSceneXMLString()
    other = slicer.vtkMRMLScene()
    already, _ = add_segmentation(other, _volume(other), ("liver",))  # takes the IDs the saved nodes had
    assert already.GetID() == node.GetID()
    other.SetLoadFromXMLString(1)
    other.SetSceneXMLString(saved)
    other.Import()
    imported_roi = other.GetFirstNodeByName("liver box")
    imported = imported_roi.GetNodeReference(keyframes.SEGMENTATION_ROLE)
    assert imported is not None and imported is not already and imported.GetName() == node.GetName()
    assert keyframes.keyframe_nodes(imported, target) == ([imported_roi], [])
    assert keyframes.keyframe_nodes(already, target) == ([], [])
    other.Clear(1)


def _markups(scene) -> tuple[list, list]:
    found = []
    for class_name in ("vtkMRMLMarkupsROINode", "vtkMRMLMarkupsLineNode"):
        collection = scene.GetNodesByClass(class_name)
        found.append([collection.GetItemAsObject(n) for n in range(collection.GetNumberOfItems())])
    return found[0], found[1]


def test_the_keyframe_table_follows_moved_points_while_observed(scene, views):
    """The panel rebuilds its keyframe table when the observer calls; here the table is rebuilt the same way
    (``table_rows`` over the scene's markups), so each step asserts what the user would see in it."""
    volume_node = _volume(scene)
    volume = geometry.volume_array(volume_node, copy=False)
    box = draw_box(scene, views, "Red", *_corners(volume_node, 2, 9, (10, 12, 40, 41)), name="box")
    keyframes.finish_placement(box, volume)  # snapped onto slice 9
    line = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", "axis")
    for ijk in ((20, 30, 4), (50, 30, 4)):
        _click(views, "Red", line, ijk_to_ras_point(volume_node, ijk))
    table = []

    def refresh():
        table[:] = [(row.node.GetName(), row.slice, row.prompt, row.problem)
                    for row in keyframes.table_rows(volume, *_markups(scene))]

    observer = keyframes.KeyframeObserver(scene, refresh)
    observer.start()
    assert table == []  # nothing has changed yet
    slice_step = ijk_to_ras_point(volume_node, (0, 0, 1)) - ijk_to_ras_point(volume_node, (0, 0, 0))
    centre = np.array(box.GetCenterWorld())
    box.SetNthControlPointPositionWorld(0, *(centre + 6 * slice_step))  # the box dragged from slice 9 to 15
    assert table == [("axis", 4, "line", ""), ("box", 15, "box 10 12 - 40 41", "")]

    line.SetNthControlPointPositionWorld(1, *ijk_to_ras_point(volume_node, (50, 30, 6)))  # one end dragged away
    assert table[0] == ("box", 15, "box 10 12 - 40 41", "") and table[1][:3] == ("axis", None, "")
    assert "line 'axis' crosses slices 4.0 to 6.0" in table[1][3]
    line.SetNthControlPointPositionWorld(0, *ijk_to_ras_point(volume_node, (20, 30, 6)))  # and the other
    assert table == [("axis", 6, "line", ""), ("box", 15, "box 10 12 - 40 41", "")]

    added = draw_box(scene, views, "Red", *_corners(volume_node, 2, 20, (5, 5, 25, 25)), name="added")
    assert table[-1] == ("added", 20, "box 5 5 - 25 25", "")  # an added markup's points are followed too
    scene.RemoveNode(added)
    assert [row[0] for row in table] == ["axis", "box"]

    observer.stop()
    before = list(table)
    box.SetNthControlPointPositionWorld(0, *centre)
    draw_box(scene, views, "Red", *_corners(volume_node, 2, 2, (5, 5, 25, 25)), name="unseen")
    assert table == before and not observer.started


def test_a_line_with_both_ends_on_one_point_is_no_keyframe(scene, views):
    volume_node = _volume(scene)
    volume = geometry.volume_array(volume_node, copy=False)
    line = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", "dot")
    point = ijk_to_ras_point(volume_node, (30, 30, 9))
    _click(views, "Red", line, point)
    _click(views, "Red", line, point)  # a double click: both ends on one spot
    assert line.GetNumberOfDefinedControlPoints() == 2
    assert keyframes.table_rows(volume, [], [line])[0].problem == "line 'dot' has both ends on one point"
    with pytest.raises(errors.InputError, match="line 'dot' has both ends on one point"):
        keyframes.line_keyframe(line, volume, 2)
    keyframe, status = keyframes.finish_placement(line, volume)
    assert keyframe is None and status == "Line 'dot' has both ends on one point; it was removed."
    assert line.GetScene() is None and scene.GetFirstNodeByName("dot") is None


def test_the_keyframe_table_reads_markups_as_the_run_will_and_says_what_is_wrong(scene, views):
    volume_node = _volume(scene)
    volume = geometry.volume_array(volume_node, copy=False)
    late = draw_box(scene, views, "Red", *_corners(volume_node, 2, 15, (10, 12, 40, 41)), name="late")
    early = draw_box(scene, views, "Red", *_corners(volume_node, 2, 4, (11, 13, 42, 44)), name="early")
    rows = keyframes.table_rows(volume, [late, early], [])
    assert [(row.slice, row.prompt, row.node.GetName(), row.problem) for row in rows] == [
        (4, "box 11 13 - 42 44", "early", ""), (15, "box 10 12 - 40 41", "late", "")]
    sagittal = draw_box(scene, views, "Yellow", *_corners(volume_node, 0, 30, (5, 5, 20, 15)), name="sagittal")
    rows = keyframes.table_rows(volume, [late, early, sagittal], [])
    assert all(row.slice is None and "different slice orientations" in row.problem for row in rows)
    assert all(row.problem == "select the volume first" for row in keyframes.table_rows(None, [late], []))
