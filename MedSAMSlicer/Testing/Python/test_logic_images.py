"""2D images in Slicer: single-slice scalar volumes and RGB vector volumes, through the logic and back."""

from __future__ import annotations

import numpy as np
import pytest

from mrml_fixtures import add_roi, add_segmentation, ijk_to_ras_point

slicer = pytest.importorskip("slicer")
skimage_data = pytest.importorskip("skimage.data")
from MedSAMSlicerLib import errors, geometry, keyframes, segments  # noqa: E402

# How Slicer places a PNG: LPS identity, i.e. RAS x and y flipped, 1 mm pixels.
PNG_IJK_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _image_volume(scene, image, class_name=None):
    return geometry.add_volume_node(scene, image, PNG_IJK_TO_RAS, "image", class_name)


@pytest.mark.parametrize("kind", ["rgb", "gray"])
def test_single_slice_image_end_to_end_through_the_logic(scene, kind):
    if kind == "rgb":
        image = skimage_data.astronaut()  # (512, 512, 3) uint8
        volume_node = _image_volume(scene, image, "vtkMRMLVectorVolumeNode")
        assert volume_node.IsA("vtkMRMLVectorVolumeNode")
    else:
        image = skimage_data.camera()  # (512, 512) uint8
        volume_node = _image_volume(scene, image)
    volume = geometry.volume_array(volume_node)
    np.testing.assert_array_equal(volume.array, image[np.newaxis])  # channels reach the client unchanged
    assert volume.rgb is (kind == "rgb")
    assert volume.size_ijk == (512, 512, 1)
    np.testing.assert_allclose(volume.direction_lps, np.eye(3))

    # an ROI drawn in the only slice view, thick as Slicer draws it in 2D: the only slice, the right pixels
    top_left, bottom_right = (150, 30), (330, 230)  # (column, row) of the box corners
    corner_a = ijk_to_ras_point(volume_node, (top_left[0] - 0.5, top_left[1] - 0.5, 0))
    corner_b = ijk_to_ras_point(volume_node, (bottom_right[0] + 0.5, bottom_right[1] + 0.5, 0))
    roi = add_roi(scene, (corner_a + corner_b) / 2, np.abs(corner_b - corner_a) + np.array([0, 0, 40.0]), "face")
    axis = keyframes.slicing_axis(volume, [roi])
    assert axis == 2
    keyframe = keyframes.roi_keyframe(roi, volume, axis)
    assert (keyframe.slice, keyframe.box) == (0, (150, 30, 330, 230))
    document = keyframes.prompt_document(axis, [keyframe])
    assert document["segments"][0]["boxes"] == [{"slice": 0, "box": [150, 30, 330, 230]}]

    node, (target,) = add_segmentation(scene, volume_node, ("target",))
    mask = np.zeros((1, 201, 181), np.uint8)
    yy, xx = np.mgrid[0:201, 0:181]
    mask[0] = ((yy - 100) / 100.0) ** 2 + ((xx - 90) / 90.0) ** 2 <= 1.0
    applied = segments.apply_labels(volume_node, node, target, (150, 30, 0), mask)
    assert applied.changed_slices == [0]
    expected = np.zeros((1, 512, 512), np.uint8)
    expected[0, 30:231, 150:331] = mask[0]
    np.testing.assert_array_equal(segments.segment_array(node, target, volume_node), expected)


def test_rgba_drops_alpha_with_a_note(scene):
    rgba = np.dstack([skimage_data.coffee()[:64, :80], np.full((64, 80), 255, np.uint8)])
    volume_node = _image_volume(scene, rgba, "vtkMRMLVectorVolumeNode")
    volume = geometry.volume_array(volume_node)
    np.testing.assert_array_equal(volume.array[0], rgba[..., :3])
    assert volume.notes and "alpha" in volume.notes[0]


def test_two_component_volume_is_refused(scene):
    volume_node = geometry.add_volume_node(scene, np.zeros((2, 8, 8, 2), np.float32), name="field")
    with pytest.raises(errors.InputError, match="field.*2 components"):
        geometry.volume_array(volume_node)


def test_volume_without_voxels_is_refused(scene):
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "loading")
    with pytest.raises(errors.InputError, match="loading.*no voxels"):
        geometry.volume_array(empty)
