"""Server results -> a segment of a real vtkMRMLSegmentationNode: exact, undoable, sparing hand edits."""

from __future__ import annotations

import numpy as np
import pytest

from mrml_fixtures import add_roi, add_segmentation, ijk_to_ras_point, paint

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402

from MedSAMSlicerLib import errors, geometry, keyframes, run, segments  # noqa: E402

SHAPE_KJI = (12, 24, 32)


def _volume(scene, directions=np.eye(3), shape=SHAPE_KJI):
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(directions) * np.array([0.8, 0.8, 2.5])
    matrix[:3, 3] = (-12.0, 30.0, 7.0)
    rng = np.random.default_rng(0)
    return geometry.add_volume_node(scene, rng.integers(-1000, 1000, shape).astype(np.int16), matrix, "volume")


def _blobs(seed, shape=SHAPE_KJI, fraction=0.3):
    return (np.random.default_rng(seed).random(shape) < fraction).astype(np.uint8)


def _filled(scene, volume_node, names=("target", "left", "right")):
    """A segmentation with several segments in one shared layer, each holding random voxels on every slice."""
    node, ids = add_segmentation(scene, volume_node, names)
    contents = {}
    taken = np.zeros(SHAPE_KJI, dtype=bool)
    for n, segment_id in enumerate(ids):
        content = _blobs(n + 10).astype(bool) & ~taken  # disjoint, so they share one labelmap layer
        taken |= content
        segments.apply_labels(volume_node, node, segment_id, (0, 0, 0), content.astype(np.uint8))
        contents[segment_id] = content.astype(np.uint8)
    return node, ids, contents


def _all_segments(node, volume_node):
    ids = [node.GetSegmentation().GetNthSegmentID(n) for n in range(node.GetSegmentation().GetNumberOfSegments())]
    return {i: segments.segment_array(node, i, volume_node) for i in ids}


def test_block_reads_back_identical_and_nothing_else_moves(scene):
    volume_node = _volume(scene)
    node, ids, contents = _filled(scene, volume_node)
    assert node.GetSegmentation().GetNumberOfLayers() == 1  # the shared-layer case is the tricky one
    for segment_id, content in contents.items():
        np.testing.assert_array_equal(segments.segment_array(node, segment_id, volume_node), content)

    # a block for slices 3..6 covering part of each slice, as the server returns it (label 1 = the segment,
    # 2 = a neighbour's voxels that must not land in this segment)
    block = np.random.default_rng(5).integers(0, 3, (4, 15, 20)).astype(np.uint16)
    offset = (6, 4, 3)
    applied = segments.apply_labels(volume_node, node, ids[0], offset, block, label=1, axis=2)

    expected = contents[ids[0]].copy()
    expected[3:7] = 0
    expected[3:7, 4:19, 6:26] = block == 1
    after = _all_segments(node, volume_node)
    np.testing.assert_array_equal(after[ids[0]], expected)
    for other in ids[1:]:
        np.testing.assert_array_equal(after[other], contents[other])
    assert applied.changed_slices == [3, 4, 5, 6]
    assert applied.voxels == int(expected[3:7].sum())

    again = segments.apply_labels(volume_node, node, ids[0], offset, block, label=1, axis=2)
    assert again.changed_slices == []  # nothing differs, nothing is written


@pytest.mark.parametrize("axis", [0, 1])
def test_blocks_along_other_axes(scene, axis):
    volume_node = _volume(scene, directions=np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], dtype=float))
    node, ids, contents = _filled(scene, volume_node, ("target", "other"))
    nk, nj, ni = SHAPE_KJI
    start = 5
    if axis == 0:  # slices i = 5..7: block (k, j, 3)
        block, offset = _blobs(7, (nk, nj, 3)), (start, 0, 0)
    else:  # slices j = 5..7: block (k, 3, i)
        block, offset = _blobs(7, (nk, 3, ni)), (0, start, 0)
    applied = segments.apply_labels(volume_node, node, ids[0], offset, block, axis=axis)
    expected = contents[ids[0]].copy()
    expected[geometry.slab_index(axis, start, start + 3)] = block
    after = _all_segments(node, volume_node)
    np.testing.assert_array_equal(after[ids[0]], expected)
    np.testing.assert_array_equal(after[ids[1]], contents[ids[1]])
    assert applied.changed_slices == [5, 6, 7]


def test_one_undo_step_restores_the_segmentation(scene):
    """The Segment Editor's undo is a vtkSegmentationHistory: one saved state before the write undoes all of it."""
    volume_node = _volume(scene)
    node, ids, contents = _filled(scene, volume_node)
    history = slicer.vtkSegmentationHistory()
    history.SetSegmentation(node.GetSegmentation())
    calls = []

    def save_state():
        calls.append(1)
        assert history.SaveState()

    segments.apply_labels(volume_node, node, ids[0], (0, 0, 2), _blobs(3, (5, 24, 32), 0.6), save_undo_state=save_state)
    assert len(calls) == 1
    assert not np.array_equal(segments.segment_array(node, ids[0], volume_node), contents[ids[0]])
    assert history.RestorePreviousState()
    after = _all_segments(node, volume_node)
    for segment_id, content in contents.items():
        np.testing.assert_array_equal(after[segment_id], content)
    # the run record went back too, so nothing looks hand-edited after an undo
    assert segments.edited_slices(node, ids[0], volume_node, 2) == []


def test_hand_edits_become_locked_slices_and_are_kept(scene):
    volume_node = _volume(scene)
    node, (target,) = add_segmentation(scene, volume_node, ("target",))
    first = np.zeros((8, 24, 32), np.uint8)
    first[:, 6:18, 8:24] = 1
    segments.apply_labels(volume_node, node, target, (0, 0, 2), first)  # a run over slices 2..9
    assert segments.edited_slices(node, target, volume_node, 2) == []

    paint(node, target, volume_node, 5, slice(0, 3), slice(0, 4))  # added voxels on a run slice
    paint(node, target, volume_node, 7, slice(6, 18), slice(8, 24), value=0)  # a run slice erased
    paint(node, target, volume_node, 11, slice(2, 5), slice(2, 5))  # a slice no run wrote
    assert segments.edited_slices(node, target, volume_node, 2) == [5, 7, 11]
    kept = segments.segment_array(node, target, volume_node)

    # the next run is told, and its result leaves those slices alone
    roi_a = add_roi(scene, ijk_to_ras_point(volume_node, (16, 12, 3)), (10.0, 10.0, 1.0), "a")
    roi_b = add_roi(scene, ijk_to_ras_point(volume_node, (16, 12, 11)), (10.0, 10.0, 1.0), "b")
    request = run.prepare_run(volume_node, node, target, [roi_a, roi_b])
    assert request.locked_slices == [5, 7, 11]
    assert request.document["segments"][0]["locked_slices"] == [5, 7, 11]
    np.testing.assert_array_equal(request.existing, kept)
    assert (request.keyframe_count, request.keyframe_spacing) == (2, 8.0)

    new = np.zeros((9, 24, 32), np.uint16)
    new[:, 2:20, 4:28] = 1
    applied = segments.apply_labels(volume_node, node, target, (0, 0, 3), new, locked_slices=request.locked_slices)
    assert applied.locked_slices == [5, 7, 11]
    assert applied.changed_slices == [3, 4, 6, 8, 9, 10]
    after = segments.segment_array(node, target, volume_node)
    for k in (5, 7, 11):
        np.testing.assert_array_equal(after[k], kept[k])
    np.testing.assert_array_equal(after[[3, 4, 6, 8, 9, 10]], new[[0, 1, 3, 5, 6, 7]])
    # locked slices stay locked on the run after that
    assert segments.edited_slices(node, target, volume_node, 2) == [5, 7, 11]


def test_run_record_survives_saving_and_loading(scene, tmp_path):
    """The digests live in a segment tag, which the .seg.nrrd keeps."""
    volume_node = _volume(scene)
    node, (target,) = add_segmentation(scene, volume_node, ("target",))
    segments.apply_labels(volume_node, node, target, (0, 0, 0), _blobs(1))
    paint(node, target, volume_node, 4, slice(0, 2), slice(0, 2))
    path = str(tmp_path / "saved.seg.nrrd")
    writer = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    writer.SetFileName(path)
    assert writer.WriteData(node)

    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    reader = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(path)
    assert reader.ReadData(loaded)
    loaded_id = loaded.GetSegmentation().GetNthSegmentID(0)
    assert segments.edited_slices(loaded, loaded_id, volume_node, 2) == [4]


def test_nothing_is_written_when_the_run_fails(scene):
    """A server that fails mid-run (stood in for by a client whose annotate raises) leaves segment and record alone."""

    class FailingClient:  # stands in for a server error after the upload; the real server is in test_end_to_end
        def upload_volume(self, array, spacing, **geometry):
            return "session"

        def annotate(self, session, document, existing=None, progress=None, cancel=None):
            raise RuntimeError("server error 500: out of memory")

    volume_node = _volume(scene)
    node, ids, contents = _filled(scene, volume_node)
    roi = add_roi(scene, ijk_to_ras_point(volume_node, (16, 12, 4)), (10.0, 10.0, 1.0))
    keyframes.tag_keyframe(roi, node, ids[0])
    tag_before = vtk.reference("")
    node.GetSegmentation().GetSegment(ids[0]).GetTag(segments.DIGEST_TAG, tag_before)
    with pytest.raises(RuntimeError, match="out of memory"):
        run.run_segmentation(FailingClient(), volume_node, node, ids[0])
    after = _all_segments(node, volume_node)
    for segment_id, content in contents.items():
        np.testing.assert_array_equal(after[segment_id], content)
    tag_after = vtk.reference("")
    node.GetSegmentation().GetSegment(ids[0]).GetTag(segments.DIGEST_TAG, tag_after)
    assert str(tag_after) == str(tag_before)


def test_a_block_that_does_not_fit_is_refused_before_writing(scene):
    volume_node = _volume(scene)
    node, ids, contents = _filled(scene, volume_node, ("target",))
    with pytest.raises(errors.InputError, match="does not fit the volume"):
        segments.apply_labels(volume_node, node, ids[0], (0, 0, 10), np.ones((4, 24, 32), np.uint8))
    with pytest.raises(errors.InputError, match="integer array"):
        segments.apply_labels(volume_node, node, ids[0], (0, 0, 0), np.ones((4, 24, 32), np.float32))
    np.testing.assert_array_equal(segments.segment_array(node, ids[0], volume_node), contents[ids[0]])


def test_oblique_volume_and_transformed_segmentation(scene):
    """Masks land on the volume's voxels even when the volume is tilted and the segmentation sits under a transform."""
    c, s = np.cos(0.4), np.sin(0.4)
    volume_node = _volume(scene, directions=np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]))
    node, (target,) = add_segmentation(scene, volume_node, ("target",))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (3.0, -7.0, 11.0)
    transform.SetMatrixTransformToParent(geometry.vtk_matrix_from_array(shift))
    node.SetAndObserveTransformNodeID(transform.GetID())
    content = _blobs(4)
    segments.apply_labels(volume_node, node, target, (0, 0, 0), content)
    np.testing.assert_array_equal(segments.segment_array(node, target, volume_node), content)


def test_request_result_apply_refuses_swapped_nodes(scene):
    volume_node = _volume(scene)
    node, (target,) = add_segmentation(scene, volume_node, ("target",))
    roi = add_roi(scene, ijk_to_ras_point(volume_node, (16, 12, 4)), (10.0, 10.0, 1.0))
    request = run.prepare_run(volume_node, node, target, [roi])
    result = run.RunResult(session=None, ijk_offset=(0, 0, 4), labels=np.ones((1, 24, 32), np.uint8), seconds=0.0)
    other, _ = add_segmentation(scene, volume_node, ("x",))
    with pytest.raises(errors.InputError, match="changed while the run"):
        run.apply_run(request, result, volume_node, other)
    applied = run.apply_run(request, result, volume_node, node)
    assert applied.changed_slices == [4]
