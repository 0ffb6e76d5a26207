"""Keyframe markups in RAS -> IJK slices and boxes, on real MRML volumes of every orientation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mrml_fixtures import add_line, add_roi, ijk_to_ras_point

slicer = pytest.importorskip("slicer")
from MedSAMSlicerLib import errors, geometry, keyframes  # noqa: E402

SIZE_IJK = (40, 30, 20)


def _rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def _matrix(directions: np.ndarray, spacing=(2.0, 3.0, 4.0), origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(directions, dtype=float) * np.array(spacing)
    matrix[:3, 3] = origin
    return matrix


GEOMETRIES = {
    "identity": np.eye(3),
    "LPS-stored (i, j flipped)": np.diag([-1.0, -1.0, 1.0]),
    "k flipped": np.diag([1.0, 1.0, -1.0]),
    "sagittal (i->A, j->-S, k->R)": np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], dtype=float),
    "coronal (i->R, j->-S, k->A)": np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float),
    "oblique": _rotation("z", 30) @ _rotation("x", 20),
    "oblique, left-handed": _rotation("y", -25) @ _rotation("z", 15) @ np.diag([-1.0, 1.0, 1.0]),
}


def _volume(scene, directions, size_ijk=SIZE_IJK, name="volume"):
    array = np.zeros(tuple(reversed(size_ijk)), dtype=np.int16)
    return geometry.add_volume_node(scene, array, _matrix(directions), name)


def _roi_on_voxels(scene, volume_node, axis, index, box, thickness=0.6, name="box"):
    """An ROI drawn over voxels ``box`` of slice ``index``, aligned with the volume's axes, ``thickness`` voxels deep.

    Built through MRML's own IJK->RAS matrix, independently of the logic under test.
    """
    u, v = geometry.in_plane_axes(axis)
    lo, hi = np.zeros(3), np.zeros(3)
    lo[axis], hi[axis] = index - thickness / 2, index + thickness / 2
    lo[u], hi[u] = box[0] - 0.5, box[2] + 0.5
    lo[v], hi[v] = box[1] - 0.5, box[3] + 0.5
    corners = np.array([ijk_to_ras_point(volume_node, c) for c in itertools.product(*zip(lo, hi))])
    centre = corners.mean(axis=0)
    directions = np.zeros((3, 3))
    volume_node.GetIJKToRASDirections(directions)
    if np.linalg.det(directions) < 0:
        directions[:, 0] *= -1
    spacing = np.array(volume_node.GetSpacing())
    return add_roi(scene, centre, (hi - lo) * spacing, name, directions)


@pytest.mark.parametrize("frame", list(GEOMETRIES))
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_roi_maps_to_its_slice_and_box(scene, frame, axis):
    volume_node = _volume(scene, GEOMETRIES[frame])
    volume = geometry.volume_array(volume_node)
    u, v = geometry.in_plane_axes(axis)
    box = (3, 4, 3 + SIZE_IJK[u] // 3, 4 + SIZE_IJK[v] // 2)
    index = SIZE_IJK[axis] // 2 - 1
    roi = _roi_on_voxels(scene, volume_node, axis, index, box)

    assert keyframes.slicing_axis(volume, [roi]) == axis  # the flat ROI tells the axis
    keyframe = keyframes.roi_keyframe(roi, volume, axis)
    assert (keyframe.slice, keyframe.box, keyframe.name) == (index, box, "box")


def test_identity_and_flipped_by_hand(scene):
    """Plain numbers: voxel (i, j, k) has its centre at origin + spacing * index (flipped: minus)."""
    straight = geometry.add_volume_node(scene, np.zeros((20, 30, 40), np.int16), _matrix(np.eye(3)), "straight")
    # i 5..12 -> x 19..35 mm; j 7..15 -> y -0.5..26.5 mm; k 8 -> z 37 mm (a ROI 1 mm thick)
    roi = add_roi(scene, (27.0, 13.0, 37.0), (16.0, 27.0, 1.0))
    assert keyframes.roi_keyframe(roi, geometry.volume_array(straight), 2).box == (5, 7, 12, 15)
    assert keyframes.roi_keyframe(roi, geometry.volume_array(straight), 2).slice == 8

    # Stored in LPS like most DICOM: x = 100 - 2 i, y = 80 - 3 j. i 5..12 -> x 75..91; j 7..15 -> y 33.5..60.5
    flipped = geometry.add_volume_node(scene, np.zeros((20, 30, 40), np.int16),
                                    _matrix(np.diag([-1.0, -1.0, 1.0]), origin=(100.0, 80.0, 5.0)), "flipped")
    roi = add_roi(scene, (83.0, 47.0, 37.0), (16.0, 27.0, 1.0))
    keyframe = keyframes.roi_keyframe(roi, geometry.volume_array(flipped), 2)
    assert (keyframe.slice, keyframe.box) == (8, (5, 7, 12, 15))


def test_a_box_one_voxel_thin_stays_one_voxel_thin(scene):
    """A target's first or last slice gives boxes like [62, 27, 64, 27]: inclusive indices, valid as drawn,
    and sent as they are (the server takes the same convention)."""
    volume_node = _volume(scene, GEOMETRIES["identity"])
    roi = _roi_on_voxels(scene, volume_node, 2, 5, (6, 9, 8, 9))
    assert keyframes.roi_keyframe(roi, geometry.volume_array(volume_node), 2).box == (6, 9, 8, 9)


@pytest.mark.parametrize("frame", ["oblique", "oblique, left-handed"])
def test_a_box_rotated_to_the_voxel_grid_is_refused_with_the_fix(scene, frame):
    """An ROI along RAS axes on a tilted volume: its bounds would be a bigger box than the one drawn."""
    volume_node = _volume(scene, GEOMETRIES[frame])
    roi = add_roi(scene, ijk_to_ras_point(volume_node, (20, 15, 9)), (30.0, 24.0, 20.0), "tilted box")
    with pytest.raises(errors.InputError, match=r"tilted box' is rotated \d+\.\d degrees .*Rotate to volume plane"):
        keyframes.roi_keyframe(roi, geometry.volume_array(volume_node), 2)


def test_ras_aligned_roi_on_a_permuted_volume_is_exact(scene):
    """A sagittal acquisition's voxel axes are RAS axes in another order: an RAS-aligned ROI maps exactly."""
    volume_node = _volume(scene, GEOMETRIES["sagittal (i->A, j->-S, k->R)"])
    volume = geometry.volume_array(volume_node)
    index = 9
    centre = ijk_to_ras_point(volume_node, (20, 15, index))
    roi = add_roi(scene, centre, (30.0, 24.0, 20.0))
    keyframe = keyframes.roi_keyframe(roi, volume, 2)
    assert keyframe.slice == index
    ii, jj = np.meshgrid(np.arange(SIZE_IJK[0]), np.arange(SIZE_IJK[1]), indexing="ij")
    centres = np.array([ijk_to_ras_point(volume_node, (i, j, index)) for i, j in zip(ii.ravel(), jj.ravel())])
    inside = np.all(np.abs(centres - centre) <= np.array([15.0, 12.0, 10.0]), axis=1)
    u0, v0, u1, v1 = keyframe.box
    assert (ii.ravel()[inside].min(), jj.ravel()[inside].min(), ii.ravel()[inside].max(),
            jj.ravel()[inside].max()) == (u0, v0, u1, v1)


def test_real_ct_right_lung_box(scene, ct_volume, reference_segmentation):
    """CTChest4 as Slicer loads it (LPS file, RAS scene): an ROI around the right lung on slice 20."""
    sitk = pytest.importorskip("SimpleITK")
    from conftest import slicerio_data

    image = sitk.ReadImage(slicerio_data("CTChest4.nrrd"))
    volume = geometry.volume_array(ct_volume)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(volume.spacing, image.GetSpacing())
    np.testing.assert_allclose(volume.direction_lps.ravel(), image.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(volume.origin_lps, image.GetOrigin(), atol=1e-6)

    labels, names = reference_segmentation
    k = 20
    rows, cols = np.nonzero(labels[k] == names["right lung"])
    box = (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))
    # the ROI's corners in RAS, from SimpleITK's own index -> LPS mapping
    lps = [image.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(kk)))
           for i, j, kk in ((box[0] - 0.5, box[1] - 0.5, k - 0.3), (box[2] + 0.5, box[3] + 0.5, k + 0.3))]
    ras = np.array(lps) * np.array([-1.0, -1.0, 1.0])
    roi = add_roi(scene, ras.mean(axis=0), np.abs(ras[1] - ras[0]), "right lung k20")
    assert keyframes.slicing_axis(volume, [roi]) == 2
    keyframe = keyframes.roi_keyframe(roi, volume, 2)
    assert (keyframe.slice, keyframe.box) == (k, box)


def test_volume_under_a_linear_transform(scene):
    """ROIs live in world coordinates; a volume moved by a parent transform is read through it."""
    volume_node = _volume(scene, np.eye(3))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, :3] = _rotation("z", 90)
    matrix[:3, 3] = (50.0, 0.0, -12.0)
    transform.SetMatrixTransformToParent(geometry.vtk_matrix_from_array(matrix))
    volume_node.SetAndObserveTransformNodeID(transform.GetID())
    # voxel (10, 6, 4) centre in world = M @ local
    local = ijk_to_ras_point(volume_node, (10, 6, 4))
    world = matrix[:3, :3] @ local + matrix[:3, 3]
    roi = add_roi(scene, world, (1.0, 1.0, 1.0), object_to_world=np.eye(3))
    keyframe = keyframes.roi_keyframe(roi, geometry.volume_array(volume_node), 2)
    assert keyframe.slice == 4
    u0, v0, u1, v1 = keyframe.box
    assert u0 <= 10 <= u1 and v0 <= 6 <= v1


def _grid_directions(volume_node) -> np.ndarray:
    """The volume's axis directions in RAS as an ROI orientation (a rotation)."""
    directions = np.zeros((3, 3))
    volume_node.GetIJKToRASDirections(directions)
    if np.linalg.det(directions) < 0:
        directions[:, 0] *= -1
    return directions


@pytest.mark.parametrize("frame", ["oblique", "coronal (i->R, j->-S, k->A)", "LPS-stored (i, j flipped)"])
def test_flatten_roi_snaps_to_one_voxel_thick_box(scene, frame):
    """A thick ROI along the voxel grid, off the voxel centres, becomes the box of its keyframe, one voxel thick;
    reading it again gives the same keyframe."""
    volume_node = _volume(scene, GEOMETRIES[frame])
    volume = geometry.volume_array(volume_node)
    centre = ijk_to_ras_point(volume_node, (18.3, 12.6, 7.2))
    roi = add_roi(scene, centre, (25.0, 18.0, 9.0), "thick", _grid_directions(volume_node))
    before = keyframes.roi_keyframe(roi, volume, 2)
    flattened = keyframes.flatten_roi(roi, volume, 2)
    assert flattened == before
    assert keyframes.roi_keyframe(roi, volume, 2) == before
    corners = volume.world_to_ijk(keyframes.roi_corners_world(roi))
    np.testing.assert_allclose(corners[:, 2].min(), before.slice - 0.5, atol=1e-6)
    np.testing.assert_allclose(corners[:, 2].max(), before.slice + 0.5, atol=1e-6)
    np.testing.assert_allclose(corners[:, 0].min(), before.box[0] - 0.5, atol=1e-6)
    np.testing.assert_allclose(corners[:, 1].max(), before.box[3] + 0.5, atol=1e-6)
    assert keyframes.slicing_axis(volume, [roi]) == 2
    # the same ROI turned 10 degrees in its slice is no box of voxels
    turned = add_roi(scene, centre, (25.0, 18.0, 9.0), "turned",
                     _grid_directions(volume_node) @ _rotation("z", 10))
    with pytest.raises(errors.InputError, match=r"'turned' is rotated 10\.0 degrees"):
        keyframes.roi_keyframe(turned, volume, 2)


def test_recist_lines_on_a_coronal_volume(scene):
    """Long and short axis drawn on coronal slice 7 -> two lines on slice 7 and the box they enclose."""
    volume_node = _volume(scene, GEOMETRIES["coronal (i->R, j->-S, k->A)"])
    volume = geometry.volume_array(volume_node)
    long_axis = add_line(scene, ijk_to_ras_point(volume_node, (10, 12, 7)), ijk_to_ras_point(volume_node, (30, 20, 7)),
                         "long axis")
    short_axis = add_line(scene, ijk_to_ras_point(volume_node, (18, 22, 7.2)),
                          ijk_to_ras_point(volume_node, (22, 10, 6.9)), "short axis")
    axis = keyframes.slicing_axis(volume, [], [long_axis, short_axis])
    assert axis == 2
    lines = [keyframes.line_keyframe(node, volume, axis) for node in (long_axis, short_axis)]
    assert [line.slice for line in lines] == [7, 7]
    np.testing.assert_allclose(lines[0].points, [[10, 12], [30, 20]], atol=1e-3)
    np.testing.assert_allclose(lines[1].points, [[18, 22], [22, 10]], atol=1e-3)

    document = keyframes.prompt_document(axis, lines=lines, segment_name="lesion")
    assert document == {"axis": 2, "window": "auto", "segments": [
        {"name": "lesion", "label": 1, "lines": [{"slice": 7, "points": [[10.0, 12.0], [30.0, 20.0]]},
                                                 {"slice": 7, "points": [[18.0, 22.0], [22.0, 10.0]]}]}]}


def test_line_across_slices_is_refused(scene):
    volume_node = _volume(scene, np.eye(3))
    start, end = ijk_to_ras_point(volume_node, (5, 5, 3)), ijk_to_ras_point(volume_node, (15, 9, 6))
    line = add_line(scene, start, end, "tilted")
    with pytest.raises(errors.InputError, match="tilted.*crosses slices"):
        keyframes.line_keyframe(line, geometry.volume_array(volume_node), 2)


def test_axis_rules(scene):
    # a thick ROI tells nothing: the axis closest to superior-inferior wins (axial slices)
    for frame, expected in (("identity", 2), ("sagittal (i->A, j->-S, k->R)", 1),
                               ("coronal (i->R, j->-S, k->A)", 1)):
        volume_node = _volume(scene, GEOMETRIES[frame])
        roi = add_roi(scene, ijk_to_ras_point(volume_node, (20, 15, 10)), (20.0, 20.0, 20.0))
        assert keyframes.slicing_axis(geometry.volume_array(volume_node), [roi]) == expected, geometry
        assert keyframes.slicing_axis(geometry.volume_array(volume_node), [roi], axis=0) == 0  # the caller's view wins
    # ROIs flat along different axes cannot be one segment's keyframes
    volume_node = _volume(scene, np.eye(3))
    volume = geometry.volume_array(volume_node)
    axial = _roi_on_voxels(scene, volume_node, 2, 5, (2, 2, 8, 8), name="axial box")
    coronal = _roi_on_voxels(scene, volume_node, 1, 5, (2, 2, 8, 8), name="coronal box")
    with pytest.raises(errors.InputError, match="axial box.*coronal box|coronal box.*axial box"):
        keyframes.slicing_axis(volume, [axial, coronal])


def test_keyframe_errors_name_the_markup(scene):
    volume_node = _volume(scene, np.eye(3))
    volume = geometry.volume_array(volume_node)
    far = add_roi(scene, ijk_to_ras_point(volume_node, (20, 15, 60)), (10.0, 10.0, 1.0), "far away")
    with pytest.raises(errors.InputError, match="far away.*outside the volume"):
        keyframes.roi_keyframe(far, volume, 2)
    beside = add_roi(scene, ijk_to_ras_point(volume_node, (80, 15, 5)), (10.0, 10.0, 1.0), "beside")
    with pytest.raises(errors.InputError, match="beside.*outside the image"):
        keyframes.roi_keyframe(beside, volume, 2)
    unplaced = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "not placed")
    with pytest.raises(errors.InputError, match="box 'not placed' was not placed"):
        keyframes.roi_keyframe(unplaced, volume, 2)
    a = keyframes.BoxKeyframe(4, (1, 1, 5, 5), "first")
    b = keyframes.BoxKeyframe(4, (2, 2, 6, 6), "second")
    with pytest.raises(errors.InputError, match="'first' and 'second' are both on slice 4"):
        keyframes.prompt_document(2, [a, b])
    with pytest.raises(errors.InputError, match="no keyframes"):
        keyframes.prompt_document(2, [], [], "liver")


def test_prompt_document_shape():
    boxes = [keyframes.BoxKeyframe(9, (1, 2, 30, 40), "b"), keyframes.BoxKeyframe(3, (5, 6, 20, 22), "a")]
    document = keyframes.prompt_document(2, boxes, segment_name="liver", window="ct-soft", locked_slices=[7, 5, 7])
    assert document == {"axis": 2, "window": "ct-soft", "segments": [
        {"name": "liver", "label": 1,
         "boxes": [{"slice": 3, "box": [5, 6, 20, 22]}, {"slice": 9, "box": [1, 2, 30, 40]}],
         "locked_slices": [5, 7]}]}
    assert keyframes.prompt_document(2, boxes, window=(-100, 200))["window"] == [-100, 200]


def test_geometry_view_does_not_copy_the_voxels(scene):
    volume_node = _volume(scene, np.eye(3))
    view = geometry.volume_array(volume_node, copy=False)
    copy = geometry.volume_array(volume_node)
    assert not view.array.flags.writeable and copy.array.flags.writeable
    assert np.shares_memory(view.array, geometry.volume_array(volume_node, copy=False).array)
    assert not np.shares_memory(copy.array, view.array)
