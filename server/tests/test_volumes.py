"""Image reading and label writing on real files in tmp_path: every format, geometry kept, bad input refused."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from PIL import Image
from skimage import data

from medsam_server.errors import InputError
from medsam_server.io import labels as label_io
from medsam_server.io.images import Volume, read_image
from medsam_server.io.labels import read_labels, segment_colour, write_labels

DATA = os.path.join(os.path.dirname(slicerio.__file__), "data")
CT_PATH = os.path.join(DATA, "CTChest4.nrrd")
SEG_PATH = os.path.join(DATA, "Segmentation.seg.nrrd")
LABELMAP_SUFFIXES = (".seg.nrrd", ".nrrd", ".nii", ".nii.gz", ".mha")


@pytest.fixture(scope="module")
def ct() -> Volume:
    return read_image(CT_PATH)


@pytest.fixture(scope="module")
def ct_labels(ct) -> tuple[np.ndarray, dict[int, str]]:
    return read_labels(SEG_PATH, ct)


def _segments(names: dict[int, str]) -> list[tuple[str, int, tuple[float, float, float]]]:
    return [(name, label, segment_colour(i)) for i, (label, name) in enumerate(sorted(names.items()))]


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def _sitk_geometry(path) -> tuple[tuple, tuple, np.ndarray]:
    image = sitk.ReadImage(str(path))
    return image.GetSpacing(), image.GetOrigin(), np.asarray(image.GetDirection()).reshape(3, 3)


# ------------------------------------------------------------------ reading volumes


def test_ct_reads_with_its_geometry(ct):
    assert ct.size == (128, 128, 34)
    assert ct.array.shape == (34, 128, 128) and not ct.rgb
    np.testing.assert_allclose(ct.direction, np.diag([-1.0, -1.0, 1.0]))
    np.testing.assert_allclose(ct.spacing, (3.046875954, 3.046875954, 10.0), atol=1e-6)
    np.testing.assert_allclose(ct.origin, (193.095993, 216.395996, -340.25), atol=1e-5)
    assert ct.notes == []
    assert ct.array.min() < -900  # Hounsfield units, untouched


def test_reference_segmentation_reads_as_named_labels(ct, ct_labels):
    labels, names = ct_labels
    assert labels.shape == ct.array.shape
    assert names[5] == "right lung" and names[6] == "left lung" and len(names) == 7
    expected = slicerio.segment_mask(slicerio.read_segmentation(SEG_PATH), "right lung").transpose(2, 1, 0)
    np.testing.assert_array_equal(labels == 5, expected)


# ------------------------------------------------------------------ label round trips


@pytest.mark.parametrize("suffix", LABELMAP_SUFFIXES)
def test_labels_round_trip_on_the_ct(tmp_path, ct, ct_labels, suffix):
    labels, names = ct_labels
    out = write_labels(tmp_path / f"lungs{suffix}", labels, ct, _segments(names))
    assert out == tmp_path / f"lungs{suffix}" and _listing(tmp_path) == [out.name]  # no temporary left
    back, back_names = read_labels(out, ct)
    np.testing.assert_array_equal(back, labels)
    if suffix == ".seg.nrrd":
        assert back_names == names
    else:
        assert sorted(back_names) == sorted(names)


def _anisotropic_flipped_copy(tmp_path, ct: Volume) -> Volume:
    """The CT with its axes permuted and flipped (a non-diagonal direction) and anisotropic spacing."""
    image = sitk.GetImageFromArray(ct.array)
    image.SetSpacing((0.7, 1.3, 2.5))
    image.SetOrigin((-12.5, 40.25, 101.0))
    # i along -y, j along +x, k along -z: a rotation plus flips, determinant +1.
    direction = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    image.SetDirection(direction.ravel().tolist())
    path = tmp_path / "flipped.nrrd"
    sitk.WriteImage(image, str(path))
    return read_image(path)


@pytest.mark.parametrize("suffix", LABELMAP_SUFFIXES)
def test_output_keeps_flipped_direction_and_anisotropic_spacing(tmp_path, ct, ct_labels, suffix):
    labels, names = ct_labels
    flipped = _anisotropic_flipped_copy(tmp_path, ct)
    np.testing.assert_allclose(flipped.spacing, (0.7, 1.3, 2.5))
    np.testing.assert_allclose(flipped.direction, [[0, 1, 0], [-1, 0, 0], [0, 0, -1]])

    out = write_labels(tmp_path / f"labels{suffix}", labels, flipped, _segments(names))
    if suffix == ".seg.nrrd":
        ijk_to_lps = np.asarray(slicerio.read_segmentation(str(out))["ijkToLPS"])
        np.testing.assert_allclose(ijk_to_lps, flipped.ijk_to_lps(), atol=1e-6)
    else:  # read back by SimpleITK itself, not by our reader
        spacing, origin, direction = _sitk_geometry(out)
        np.testing.assert_allclose(spacing, flipped.spacing, atol=1e-5)
        np.testing.assert_allclose(origin, flipped.origin, atol=1e-4)
        np.testing.assert_allclose(direction, flipped.direction, atol=1e-6)
    back, _ = read_labels(out, flipped)
    np.testing.assert_array_equal(back, labels)
    # The same voxels do not belong to the original CT: its geometry differs.
    with pytest.raises(InputError, match="spacing"):
        read_labels(out, ct)


def test_seg_nrrd_has_named_coloured_segments_for_slicerio(tmp_path, ct, ct_labels):
    labels, names = ct_labels
    segments = [("right lung", 5, (0.1, 0.8, 0.3)), ("left lung", 6, (0.8, 0.1, 0.4))]
    lungs = np.where(np.isin(labels, (5, 6)), labels, 0)
    out = write_labels(tmp_path / "lungs.seg.nrrd", lungs, ct, segments)
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["right lung", "left lung"]
    assert [s["labelValue"] for s in seg["segments"]] == [5, 6]
    np.testing.assert_allclose([s["color"] for s in seg["segments"]], [(0.1, 0.8, 0.3), (0.8, 0.1, 0.4)])
    for name, label, _ in segments:
        np.testing.assert_array_equal(slicerio.segment_mask(seg, name).transpose(2, 1, 0), labels == label)


def test_seg_nrrd_opens_in_slicer_mrml(tmp_path, ct, ct_labels):
    """Slicer's own segmentation reader (slicer-core's MRML, no GUI) loads what we write."""
    from slicer import vtkMRMLScene, vtkMRMLSegmentationNode, vtkMRMLSegmentationStorageNode
    from vtk.util.numpy_support import vtk_to_numpy

    labels, names = ct_labels
    out = write_labels(tmp_path / "all.seg.nrrd", labels, ct, _segments(names))
    scene = vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert isinstance(node, vtkMRMLSegmentationNode)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    assert isinstance(storage, vtkMRMLSegmentationStorageNode)
    storage.SetFileName(str(out))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(names)
    loaded = {segmentation.GetNthSegment(n).GetName(): n for n in range(segmentation.GetNumberOfSegments())}
    assert set(loaded) == set(names.values())
    right = segmentation.GetNthSegment(loaded["right lung"])
    np.testing.assert_allclose(right.GetColor(), segment_colour(sorted(names).index(5)), atol=1e-6)
    labelmap = right.GetRepresentation("Binary labelmap")
    voxels = vtk_to_numpy(labelmap.GetPointData().GetScalars())
    assert int(np.count_nonzero(voxels == right.GetLabelValue())) == int(np.count_nonzero(labels == 5))
    # The reference geometry we store is the CT's (Slicer edits on that grid).
    assert segmentation.GetConversionParameter("Reference image geometry").endswith("0;127;0;127;0;33;")


def test_cropped_slicer_segmentation_is_padded_into_the_image_grid(tmp_path, ct, ct_labels):
    """Slicer writes only the occupied extent and a ReferenceImageExtentOffset; we place it back."""
    import nrrd
    from slicer import vtkMRMLScene

    labels, names = ct_labels
    full = write_labels(tmp_path / "all.seg.nrrd", labels, ct, _segments(names))
    scene = vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    reader = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(full))
    assert reader.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    for label, _ in names.items():
        if label != 6:
            segmentation.RemoveSegment(f"Segment_{label}")
    writer = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    cropped = tmp_path / "left-lung-cropped.seg.nrrd"
    writer.SetFileName(str(cropped))
    writer.SetCropToMinimumExtent(True)
    assert writer.WriteData(node) == 1

    header = nrrd.read_header(str(cropped))
    offset = [int(v) for v in header["Segmentation_ReferenceImageExtentOffset"].split()]
    assert any(offset) and tuple(header["sizes"]) != ct.size  # really cropped
    back, back_names = read_labels(cropped, ct)
    assert back.shape == labels.shape and back_names == {6: "left lung"}
    np.testing.assert_array_equal(back == 6, labels == 6)
    assert set(np.unique(back)) == {0, 6}


def test_overlapping_segments_sharing_a_label_value_are_refused_naming_both(ct):
    """One .seg.nrrd behaviour for every command (io/segnrrd.py): a segment's label is its labelValue, so two
    segments in different layers with one value are refused rather than renumbered or flattened."""
    path = os.path.join(DATA, "SegmentationOverlapping.seg.nrrd")
    with pytest.raises(InputError, match="segments 'ribs' and 'overlapping sphere' share label value 1"):
        read_labels(path, ct)


def test_a_layered_segmentation_with_distinct_values_keeps_each_segment_exactly(tmp_path, ct, ct_labels):
    """Layers whose label values differ are read segment by segment; flattened, the later segment wins."""
    from medsam_server.io.labels import read_label_file

    labels, names = ct_labels
    seg = slicerio.read_segmentation(os.path.join(DATA, "Segmentation.seg.nrrd"))
    right, left = (labels == 5).transpose(2, 1, 0), (labels == 6).transpose(2, 1, 0)
    grown = np.logical_or(left, np.roll(right, 3, axis=0))  # overlaps the right lung
    seg["voxels"] = np.stack([np.where(right, 5, 0), np.where(grown, 6, 0)]).astype(np.uint8)
    seg["ijkToLPS"], seg["referenceImageExtentOffset"] = ct.ijk_to_lps(), [0, 0, 0]
    seg["segments"] = [dict(s, layer=0 if s["labelValue"] == 5 else 1) for s in seg["segments"]
                       if s["labelValue"] in (5, 6)]
    path = tmp_path / "layers.seg.nrrd"
    slicerio.write_segmentation(str(path), seg)
    read = read_label_file(path)
    assert len(read.layers) == 2 and set(read.labels) == {5, 6}
    np.testing.assert_array_equal(read.mask(5), labels == 5)
    np.testing.assert_array_equal(read.mask(6), grown.transpose(2, 1, 0))
    flat, flat_names = read_labels(path, ct)
    assert flat_names == {5: "right lung", 6: "left lung"}
    np.testing.assert_array_equal(flat == 6, grown.transpose(2, 1, 0))
    np.testing.assert_array_equal(flat == 5, (labels == 5) & ~grown.transpose(2, 1, 0))


def test_label_geometry_mismatch_names_the_field(tmp_path, ct, ct_labels):
    labels, _ = ct_labels
    for field, change in (("spacing", lambda im: im.SetSpacing((1.0, 1.0, 1.0))),
                          ("origin", lambda im: im.SetOrigin((0.0, 0.0, 0.0))),
                          ("direction", lambda im: im.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1)))):
        image = sitk.GetImageFromArray(labels)
        image.SetSpacing(ct.spacing)
        image.SetOrigin(ct.origin)
        image.SetDirection(ct.direction.ravel().tolist())
        change(image)
        path = tmp_path / f"wrong-{field}.nrrd"
        sitk.WriteImage(image, str(path))
        with pytest.raises(InputError, match=field):
            read_labels(path, ct)
    small = tmp_path / "small.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(labels[:10]), str(small))
    with pytest.raises(InputError, match=r"size \[128, 128, 10\]"):
        read_labels(small, ct)
    with pytest.raises(InputError, match="does not exist"):
        read_labels(tmp_path / "missing.nrrd", ct)


# ------------------------------------------------------------------ DICOM series


def _write_dicom_series(folder, volume: Volume, series_uid: str, description: str) -> None:
    """One file per slice with the tags a series reader needs (SimpleITK writes real DICOM)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(volume.array.astype(np.int16))
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction.ravel().tolist())
    d = volume.direction
    orientation = "\\".join(f"{v:.6f}" for v in (*d[:, 0], *d[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000e", series_uid), ("0008|103e", description),
                           ("0020|0013", str(k + 1)), ("0020|0037", orientation),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in position)),
                           ("0018|0050", f"{volume.spacing[2]:.6f}"),
                           ("0008|0018", f"{series_uid}.{k + 1}")):
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid.rsplit('.', 1)[-1]}-{k:03d}.dcm"))
        writer.Execute(slice_)


def test_dicom_series_folder_reads_with_geometry(tmp_path, ct):
    folder = tmp_path / "series"
    _write_dicom_series(folder, ct, "1.2.826.0.1.3680043.2.1125.1.1", "chest")
    volume = read_image(folder)
    assert volume.size == ct.size
    np.testing.assert_array_equal(volume.array, ct.array)
    np.testing.assert_allclose(volume.spacing, ct.spacing, atol=1e-4)
    np.testing.assert_allclose(volume.origin, ct.origin, atol=1e-4)
    np.testing.assert_allclose(volume.direction, ct.direction, atol=1e-6)


def test_dicom_folder_with_two_series_lists_them(tmp_path, ct):
    small = Volume(ct.array[:3], ct.spacing, ct.origin, ct.direction, [])
    _write_dicom_series(tmp_path / "two", small, "1.2.826.0.1.3680043.2.1125.1.1", "chest")
    _write_dicom_series(tmp_path / "two", small, "1.2.826.0.1.3680043.2.1125.1.2", "chest again")
    with pytest.raises(InputError, match="2 image series") as err:
        read_image(tmp_path / "two")
    assert "1.2.826.0.1.3680043.2.1125.1.1 'chest' (CT, CT Image Storage, 3 files)" in str(err.value)
    assert "1.2.826.0.1.3680043.2.1125.1.2 'chest again' (CT, CT Image Storage, 3 files)" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no DICOM files"):
        read_image(tmp_path / "empty")


# ------------------------------------------------------------------ 2D pictures


def _rgb16() -> np.ndarray:
    return (data.astronaut()[:64, :80].astype(np.uint16) * 257 + 3).astype(np.uint16)


@pytest.mark.parametrize(("name", "make", "save"), [
    ("gray8.png", lambda: data.camera(), "pillow"),
    ("gray16.png", lambda: data.camera().astype(np.uint16) * 257, "pillow"),
    ("rgb8.png", lambda: data.astronaut(), "pillow"),
    ("rgb16.png", _rgb16, "sitk"),
    ("gray16.tif", lambda: data.camera().astype(np.uint16) * 64, "pillow"),
    ("rgb8.tiff", lambda: data.coffee(), "pillow"),
    ("rgb16.tif", _rgb16, "sitk"),
    ("gray8.bmp", lambda: data.coins(), "pillow"),
    ("rgb8.bmp", lambda: data.coffee(), "pillow"),
])
def test_pictures_read_exactly(tmp_path, name, make, save):
    pixels = make()
    path = tmp_path / name
    if save == "pillow":
        Image.fromarray(pixels).save(path)
    else:  # Pillow cannot write 16-bit RGB; SimpleITK can
        sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=True), str(path))
    volume = read_image(path)
    assert volume.array.dtype == pixels.dtype
    np.testing.assert_array_equal(volume.array[0], pixels)
    assert volume.rgb == (pixels.ndim == 3)
    assert volume.size == (pixels.shape[1], pixels.shape[0], 1)
    assert volume.spacing == (1.0, 1.0, 1.0) and volume.origin == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(volume.direction, np.eye(3))
    assert volume.notes == []


def test_jpeg_reads_as_rgb(tmp_path):
    Image.fromarray(data.coffee()).save(tmp_path / "coffee.jpg", quality=95)
    volume = read_image(tmp_path / "coffee.jpg")
    assert volume.rgb and volume.array.shape == (1, 400, 600, 3)
    assert np.abs(volume.array[0].astype(int) - data.coffee()).mean() < 3  # lossy, but the same picture


def test_rgba_png_drops_alpha_with_a_note(tmp_path):
    rgba = np.dstack([data.astronaut(), np.full((512, 512), 128, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    volume = read_image(tmp_path / "rgba.png")
    assert volume.rgb
    np.testing.assert_array_equal(volume.array[0], data.astronaut())
    assert volume.notes == ["alpha channel dropped (the image is used as if opaque)"]

    Image.fromarray(data.camera()).convert("LA").save(tmp_path / "la.png")
    gray = read_image(tmp_path / "la.png")
    assert not gray.rgb
    np.testing.assert_array_equal(gray.array[0], data.camera())
    assert gray.notes == ["alpha channel dropped (the image is used as if opaque)"]


def test_palette_png_becomes_rgb_or_gray_with_a_note(tmp_path):
    picture = Image.fromarray(data.coffee()).quantize(64)
    picture.save(tmp_path / "palette.png")
    volume = read_image(tmp_path / "palette.png")
    assert volume.rgb
    np.testing.assert_array_equal(volume.array[0], np.asarray(picture.convert("RGB")))
    assert volume.notes == ["palette image converted to RGB"]

    gray_palette = Image.fromarray(data.camera()).convert("P")  # L -> P keeps a gray palette
    assert gray_palette.mode == "P"
    gray_palette.save(tmp_path / "gray-palette.png")
    gray = read_image(tmp_path / "gray-palette.png")
    assert not gray.rgb and gray.array.shape == (1, 512, 512)
    np.testing.assert_array_equal(gray.array[0], np.asarray(gray_palette.convert("L")))
    assert gray.notes == ["palette image with a gray palette read as grayscale"]


def test_single_frame_gif_reads_and_animated_gif_is_refused(tmp_path):
    Image.fromarray(data.camera()).save(tmp_path / "still.gif")
    still = read_image(tmp_path / "still.gif")
    assert still.array.shape == (1, 512, 512)

    frames = [Image.fromarray(np.roll(data.camera(), shift, axis=1)) for shift in (0, 20, 40)]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(InputError, match="moving.gif has 3 frames"):
        read_image(tmp_path / "moving.gif")

    pages = [Image.fromarray(data.camera()), Image.fromarray(data.coins())]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(InputError, match="pages.tif has 2 frames"):
        read_image(tmp_path / "pages.tif")


def test_too_small_images_are_refused(tmp_path):
    Image.fromarray(np.array([[7]], np.uint8)).save(tmp_path / "dot.png")
    with pytest.raises(InputError, match="dot.png is 1x1 pixels: too small to segment"):
        read_image(tmp_path / "dot.png")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 1, 9), np.int16)), str(tmp_path / "thin.nrrd"))
    with pytest.raises(InputError, match="9x1 pixels"):
        read_image(tmp_path / "thin.nrrd")


def test_4d_and_two_channel_volumes_are_refused(tmp_path):
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))] * 2)
    sitk.WriteImage(four_d, str(tmp_path / "series.nrrd"))
    with pytest.raises(InputError, match=r"series.nrrd is 4D \(size 6x5x4x2\)"):
        read_image(tmp_path / "series.nrrd")
    # A single time point is just a volume.
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(np.ones((4, 5, 6), np.int16))]), str(tmp_path / "one.nrrd"))
    one = read_image(tmp_path / "one.nrrd")
    assert one.size == (6, 5, 4) and one.notes == ["4D image with a single time point read as 3D"]

    two = sitk.GetImageFromArray(np.zeros((4, 5, 6, 2), np.float32), isVector=True)
    sitk.WriteImage(two, str(tmp_path / "field.nrrd"))
    with pytest.raises(InputError, match="field.nrrd has 2 values per voxel"):
        read_image(tmp_path / "field.nrrd")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "nothing.nrrd")
    (tmp_path / "notes.nrrd").write_text("not an image\n")
    with pytest.raises(InputError, match="cannot read notes.nrrd"):
        read_image(tmp_path / "notes.nrrd")
    (tmp_path / "notes.png").write_text("not a picture either\n")
    with pytest.raises(InputError, match="cannot read notes.png"):
        read_image(tmp_path / "notes.png")


# ------------------------------------------------------------------ writing: PNG and refusals


def test_png_labels_for_a_2d_image(tmp_path):
    Image.fromarray(data.coins()).save(tmp_path / "coins.png")
    image = read_image(tmp_path / "coins.png")
    labels = np.zeros(image.array.shape, np.uint8)
    labels[0, 10:50, 20:80] = 1
    labels[0, 100:120, 200:300] = 2
    out = write_labels(tmp_path / "coins-labels.png", labels, image, [("a", 1, (1, 0, 0)), ("b", 2, (0, 1, 0))])
    written = np.asarray(Image.open(out))
    assert written.dtype == np.uint8
    np.testing.assert_array_equal(written, labels[0])
    back, names = read_labels(out, image)
    np.testing.assert_array_equal(back, labels)
    assert names == {1: "label 1", 2: "label 2"}
    # The same labels as a labelmap keep the picture's pixel geometry.
    nrrd_out = write_labels(tmp_path / "coins-labels.nrrd", labels, image, [("a", 1, (1, 0, 0)), ("b", 2, (0, 1, 0))])
    np.testing.assert_array_equal(read_labels(nrrd_out, image)[0], labels)


def test_write_refusals_leave_nothing_behind(tmp_path, ct, ct_labels):
    labels, names = ct_labels
    segments = _segments(names)
    before = _listing(tmp_path)
    cases = [
        (tmp_path / "ct.png", labels, segments, "PNG label image holds one 2D slice"),
        (tmp_path / "ct.jpg", labels, segments, "must end in .seg.nrrd, .png"),
        (tmp_path / "ct.nrrd", labels[:5], segments, r"labels have shape \(5, 128, 128\)"),
        (tmp_path / "ct.nrrd", labels, segments[:3], r"labels \[4, 5, 6, 7\] appear in the label array but in no"),
        (tmp_path / "ct.nrrd", labels, [*segments, ("again", 1, (0, 0, 0))], "label 1 is used by two segments"),
        (tmp_path / "ct.nrrd", labels, [("bad", 1, (2.0, 0, 0))], "colour must be three values in 0..1"),
        (tmp_path / "ct.seg.nrrd", labels, [("two\nlines", 1, (0, 0, 0))], "must be non-empty text on one line"),
        (tmp_path / "ct.nrrd", labels.astype(np.float32) + 0.5, segments, "non-integer"),
        (tmp_path, labels, segments, "is a folder"),
    ]
    for path, array, segs, message in cases:
        with pytest.raises(InputError, match=message):
            write_labels(path, array, ct, segs)
    assert _listing(tmp_path) == before


def test_png_label_limit_and_input_overwrite(tmp_path):
    Image.fromarray(data.coins()).save(tmp_path / "coins.png")
    image = read_image(tmp_path / "coins.png")
    labels = np.zeros(image.array.shape, np.uint16)
    labels[0, :5, :5] = 300
    with pytest.raises(InputError, match="labels up to 255, got 300"):
        write_labels(tmp_path / "big.png", labels, image, [("a", 300, (1, 0, 0))])
    original = (tmp_path / "coins.png").read_bytes()
    with pytest.raises(InputError, match="refusing to write the labels over the input image"):
        write_labels(tmp_path / "coins.png", labels.clip(0, 1), image, [("a", 1, (1, 0, 0))],
                     input_path=tmp_path / "coins.png")
    # The same file by another spelling of its path.
    with pytest.raises(InputError, match="refusing"):
        write_labels(tmp_path / "." / "coins.png", labels.clip(0, 1), image, [("a", 1, (1, 0, 0))],
                     input_path=str(tmp_path / "coins.png"))
    assert (tmp_path / "coins.png").read_bytes() == original
    assert _listing(tmp_path) == ["coins.png"]


def test_failed_write_leaves_no_partial_file(tmp_path, ct, ct_labels, monkeypatch):
    """A disk that fills up mid-write cannot be made here, so the writer is replaced by one that
    writes half a file and then fails the way a full disk does (OSError ENOSPC)."""
    labels, names = ct_labels
    (tmp_path / "old.nrrd").write_bytes(b"previous result")

    def half_then_full(tmp, labels, reference):
        tmp.write_bytes(b"NRRD0004\n half a header")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(label_io, "_write_labelmap", half_then_full)
    with pytest.raises(InputError, match="cannot write .*old.nrrd: No space left on device"):
        write_labels(tmp_path / "old.nrrd", labels, ct, _segments(names))
    assert _listing(tmp_path) == ["old.nrrd"]
    assert (tmp_path / "old.nrrd").read_bytes() == b"previous result"  # the previous file survives


def test_output_folder_is_created(tmp_path, ct, ct_labels):
    labels, names = ct_labels
    out = write_labels(tmp_path / "out" / "nested" / "lungs.seg.nrrd", labels, ct, _segments(names))
    assert out.is_file()


def test_segment_colours_are_distinct():
    colours = [segment_colour(i) for i in range(40)]
    assert len(set(colours)) == 40
    assert all(0.0 <= c <= 1.0 for colour in colours for c in colour)
    # The first dozen are far apart (at least 0.2 in some channel from each other).
    first = np.array(colours[:12])
    gaps = np.abs(first[:, None] - first[None]).max(axis=-1) + np.eye(12)
    assert gaps.min() >= 0.2
    with pytest.raises(ValueError):
        segment_colour(-1)
