"""The panel's review and refine decisions (issue 14), headless on real MRML and a real ``medsam serve``.

Review list and slice jumps (real vtkMRMLSliceNodes, one of them oblique), the quality choice, a per-slice
threshold, and a re-box after a keyframe's corner moved.
"""

from __future__ import annotations

import numpy as np
import pytest

from mrml_fixtures import add_roi, add_segmentation, ijk_to_ras_point, paint

slicer = pytest.importorskip("slicer")

from MedSAMSlicerLib import errors, geometry, keyframes, review, run, segments  # noqa: E402

KEYFRAMES = (12, 22, 31)
BOX = (70, 40, 110, 95)  # right lung of CTChest4: i_min, j_min, i_max, j_max


def _rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])}[axis]


def _slice_node(scene, name: str, slice_to_ras: np.ndarray):
    """A slice view's node as Slicer's layout makes it; ``slice_to_ras`` 3x3 (columns x, y, normal)."""
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode", name)
    node.SetLayoutName(name)
    node.SetDimensions(256, 256, 1)
    node.SetFieldOfView(250.0, 250.0, 1.0)
    matrix = np.eye(4)
    matrix[:3, :3] = slice_to_ras
    node.GetSliceToRAS().DeepCopy(geometry.vtk_matrix_from_array(matrix))
    node.UpdateMatrices()
    return node


AXIAL = np.array([[-1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
CORONAL = np.array([[-1.0, 0, 0], [0, 0, 1], [0, 1, 0]])


def _roi_box(scene, volume_node, k, box, name):
    i0, j0, i1, j1 = box
    corner_a = ijk_to_ras_point(volume_node, (i0 - 0.5, j0 - 0.5, k - 0.15))
    corner_b = ijk_to_ras_point(volume_node, (i1 + 0.5, j1 + 0.5, k + 0.15))
    return add_roi(scene, (corner_a + corner_b) / 2, np.abs(corner_b - corner_a), name)


def _lung_run(scene, ct_volume, client):
    """Keyframes on the right lung, one run applied: (segmentation node, segment id, request, result, rois)."""
    segmentation_node, (segment_id,) = add_segmentation(scene, ct_volume, ("right lung",))
    rois = {}
    for k in KEYFRAMES:
        rois[k] = _roi_box(scene, ct_volume, k, BOX, f"k{k}")
        keyframes.tag_keyframe(rois[k], segmentation_node, segment_id)
    request = run.prepare_run(ct_volume, segmentation_node, segment_id)
    result = run.execute_run(client, request)
    run.apply_run(request, result, ct_volume, segmentation_node)
    return segmentation_node, segment_id, request, result, rois


def test_a_review_click_jumps_every_view_through_the_slice(scene, ct_volume):
    oblique = AXIAL @ _rotation("x", 25.0) @ _rotation("y", 10.0)
    red, green, tilted = (_slice_node(scene, "Red", AXIAL), _slice_node(scene, "Green", CORONAL),
                          _slice_node(scene, "Tilted", oblique))
    point = geometry.jump_to_slice([red, green, tilted], ct_volume, 2, 17)
    np.testing.assert_allclose(point, ijk_to_ras_point(ct_volume, (63.5, 63.5, 17)), atol=1e-6)
    for node in (red, green, tilted):  # every plane now holds the slice's centre
        slice_to_ras = geometry.array_from_vtk_matrix(node.GetSliceToRAS())
        assert abs(float(np.dot(slice_to_ras[:3, 2], point - slice_to_ras[:3, 3]))) < 1e-6, node.GetName()
    np.testing.assert_allclose(geometry.array_from_vtk_matrix(tilted.GetSliceToRAS())[:3, :3], oblique, atol=1e-9)
    assert geometry.view_slice(red, ct_volume, 2) == 17
    assert geometry.view_slice(tilted, ct_volume, 2) is None  # oblique: it shows no one slice
    assert geometry.view_slice(green, ct_volume, 2) is None
    assert geometry.view_slice(green, ct_volume, 1) in (63, 64)
    for k in (0, 33):  # the first and last slice
        geometry.jump_to_slice([red], ct_volume, 2, k)
        assert geometry.view_slice(red, ct_volume, 2) == k
    with pytest.raises(errors.InputError, match="outside"):
        geometry.jump_to_slice([red], ct_volume, 2, 34)


def test_review_state_marks_slices_and_keeps_them_over_a_new_ranking():
    summary = {"review": [{"name": "lung", "label": 1, "slices": [
        {"slice": 4, "confidence": 0.9, "keyframe": True}, {"slice": 5, "confidence": 0.1, "keyframe": False},
        {"slice": 6, "confidence": 0.4, "keyframe": False}]}]}
    state = review.ReviewState.from_summary("seg", 2, summary)
    assert [r.slice for r in state.rows] == [5, 6, 4] and state.progress == (0, 3)
    assert state.next_to_review().slice == 5
    assert state.mark_reviewed([5, 40]) == [5]  # a slice the run did not decode is not listed
    assert state.mark_reviewed([5]) == [] and state.is_reviewed(5) and not state.is_reviewed(6)
    assert state.next_to_review().slice == 6
    state.rerank({"name": "lung", "label": 1, "slices": [{"slice": 4, "confidence": 0.05},
                                                         {"slice": 5, "confidence": 0.2},
                                                         {"slice": 6, "confidence": 0.3}]})
    assert [r.slice for r in state.rows] == [4, 5, 6] and state.is_reviewed(5) and state.progress == (1, 3)
    state.mark_reviewed([4, 6])
    assert state.next_to_review() is None and state.progress == (3, 3)
    assert review.ReviewState.from_summary("seg", 2, {}).rows == []


def test_after_a_rebox_the_list_is_reranked_and_the_slice_reviewed():
    first = {"review": [{"name": "lung", "label": 1, "slices": [{"slice": 4, "confidence": 0.2},
                                                                {"slice": 5, "confidence": 0.6}]}]}
    state = review.state_after_run(None, "seg", 2, first)
    state.mark_reviewed([5])
    reboxed = {"review": [{"name": "lung", "label": 1, "slices": [{"slice": 4, "confidence": 0.9},
                                                                  {"slice": 5, "confidence": 0.6}]}]}
    after = review.state_after_run(state, "seg", 2, reboxed, only_slice=4)
    assert after is state and [r.slice for r in after.rows] == [5, 4] and after.reviewed == {4, 5}
    assert review.state_after_run(state, "seg", 2, first).reviewed == set()  # a whole run: a new list
    assert review.state_after_run(state, "other", 2, reboxed, only_slice=4).reviewed == {4}  # another segment


def test_rebox_needs_the_shown_slice_to_be_a_keyframe():
    request = run.RunRequest(volume=None, document={"axis": 2, "segments": [
        {"name": "lung", "boxes": [{"slice": 3, "box": [1, 1, 5, 5]}],
         "lines": [{"slice": 9, "points": [[1, 1], [4, 4]]}, {"slice": 9, "points": [[1, 4], [4, 1]]}]}]},
        axis=2, segment_id="seg", locked_slices=[], existing=None, keyframe_count=2, keyframe_spacing=6.0)
    assert run.keyframe_slices(request) == [3, 9]
    assert run.rebox_target(request, 9) == 9
    with pytest.raises(errors.InputError, match="show the slice to re-box in the red view"):
        run.rebox_target(request, None)
    with pytest.raises(errors.InputError, match="slice 4 has no keyframe"):
        run.rebox_target(request, 4)


def test_quality_names_map_to_options_the_server_accepts():
    requests = pytest.importorskip("medsam_server.requests")
    assert run.QUALITIES == ("fast", "best")
    assert run.DEFAULT_THRESHOLD == pytest.importorskip("medsam_server.protocol").MASK_THRESHOLD
    assert run.quality_options("fast") == {}
    assert run.quality_options("best") == {"views": True}
    assert run.quality_options("best", single_slice=True) == {}
    for quality in run.QUALITIES:
        options = requests.parse_options(run.quality_options(quality), 34)
        assert options.views == (quality == "best")
        assert options.intensity_weight == requests.INTENSITY_WEIGHT  # the server's default fusion in both
        single = {**run.quality_options(quality, single_slice=True), "only_slice": 3, "propagate": 0}
        assert requests.parse_options(single, 34).only_slice == 3  # views would be refused with one slice
    with pytest.raises(errors.InputError, match="quality is one of fast, best"):
        run.quality_options("slow")

# ------------------------------------------------------------------------------------------------ real server


def test_the_review_list_of_a_real_run_marks_jumped_and_edited_slices(scene, ct_volume, server):
    _, client = server
    segmentation_node, segment_id, request, result, _ = _lung_run(scene, ct_volume, client)
    state = review.ReviewState.from_summary(segment_id, request.axis, result.summary)
    listed = {r.slice for r in state.rows}
    assert set(range(12, 32)) <= listed and state.progress == (0, len(listed))
    assert [r.confidence for r in state.rows] == sorted(r.confidence for r in state.rows)
    assert state.mark_edited(segmentation_node, ct_volume) == []  # nothing edited by hand yet

    worst = state.next_to_review()
    red = _slice_node(scene, "Red", AXIAL)
    geometry.jump_to_slice([red], ct_volume, request.axis, worst.slice)
    assert state.mark_reviewed([geometry.view_slice(red, ct_volume, request.axis)]) == [worst.slice]

    edited = next(r.slice for r in state.rows if not state.is_reviewed(r.slice))
    paint(segmentation_node, segment_id, ct_volume, edited, slice(100, 104), slice(10, 14))
    assert state.mark_edited(segmentation_node, ct_volume) == [edited]
    assert state.progress == (2, len(listed)) and state.next_to_review().slice not in (worst.slice, edited)


def test_a_per_slice_threshold_writes_that_slice_alone_as_one_undo_step(scene, ct_volume, server):
    _, client = server
    segmentation_node, segment_id, request, result, _ = _lung_run(scene, ct_volume, client)
    before = segments.segment_array(segmentation_node, segment_id, ct_volume).copy()
    undo_steps = []
    applied, header = run.apply_threshold(client, result.session, ct_volume, segmentation_node, segment_id, label=1,
                                          slices={22: 0.2}, save_undo_state=lambda: undo_steps.append(1))
    after = segments.segment_array(segmentation_node, segment_id, ct_volume)
    assert applied.changed_slices == [22] and undo_steps == [1]
    others = [k for k in range(after.shape[0]) if k != 22]
    np.testing.assert_array_equal(after[others], before[others])
    assert after[22].sum() > before[22].sum() and not (before[22] & ~after[22]).any()  # lower: only grows
    _, segment_wide = client.threshold(result.session, label=1, threshold=0.2)  # the same 0.2 for the segment
    np.testing.assert_array_equal(after[22], segment_wide[22])
    state = review.ReviewState.from_summary(segment_id, request.axis, result.summary)
    state.rerank(header["review"])
    assert 22 in {r.slice for r in state.rows}


def test_a_moved_keyframe_is_reboxed_on_its_slice_alone(scene, ct_volume, server):
    _, client = server
    segmentation_node, segment_id, request, result, rois = _lung_run(scene, ct_volume, client)
    before = segments.segment_array(segmentation_node, segment_id, ct_volume).copy()
    new_box = (70, 40, 92, 78)  # the corner (110, 95) dragged in to (92, 78)
    assert before[22][:, new_box[2] + 4:].any() and before[22][new_box[3] + 4:, :].any()
    corner_a = ijk_to_ras_point(ct_volume, (new_box[0] - 0.5, new_box[1] - 0.5, 22 - 0.15))
    corner_b = ijk_to_ras_point(ct_volume, (new_box[2] + 0.5, new_box[3] + 0.5, 22 + 0.15))
    roi = rois[22]
    roi.SetNthControlPointPositionWorld(0, *((corner_a + corner_b) / 2))  # the ROI's one control point: its centre
    roi.SetSize(*np.abs(corner_b - corner_a))
    request = run.prepare_run(ct_volume, segmentation_node, segment_id)
    assert {"slice": 22, "box": list(new_box)} in request.document["segments"][0]["boxes"]
    with pytest.raises(errors.InputError, match="slice 17 has no keyframe"):
        run.rebox_slice(client, request, 17, session=result.session)

    reboxed = run.rebox_slice(client, request, 22, session=result.session)
    assert set(reboxed.summary["changed_slices"]) == {22}
    undo_steps = []
    applied = run.apply_run(request, reboxed, ct_volume, segmentation_node, lambda: undo_steps.append(1))
    assert applied.changed_slices == [22] and undo_steps == [1]
    after = segments.segment_array(segmentation_node, segment_id, ct_volume)
    others = [k for k in range(after.shape[0]) if k != 22]
    np.testing.assert_array_equal(after[others], before[others])
    rows, cols = np.nonzero(after[22])  # the mask follows the new box (within the model's few pixels)
    assert rows.size > 200
    assert cols.min() >= new_box[0] - 3 and cols.max() <= new_box[2] + 3
    assert rows.min() >= new_box[1] - 3 and rows.max() <= new_box[3] + 3
    assert segments.edited_slices(segmentation_node, segment_id, ct_volume, 2) == []  # a run wrote it, not a hand
