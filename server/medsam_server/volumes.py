"""Reading images and writing label images: every file format the command line and server accept.

Frames and conventions (DESIGN.md sections 4 and 5):
- A :class:`Volume` array is numpy ``(k, j, i)`` as SimpleITK's ``GetArrayFromImage`` gives it,
  with a trailing axis of 3 for RGB. A 2D image is a volume of one slice (k = 1).
- ``spacing`` and ``origin`` are in SimpleITK order (i, j, k), millimetres, LPS.
- ``direction`` is the (3, 3) LPS matrix whose columns are the i, j, k axes.

What is read:
- anything SimpleITK reads (NRRD, NIfTI, MHA, a single DICOM file) and a folder holding one DICOM series;
- PNG, JPEG, TIFF, BMP and GIF images, grayscale or RGB, 8- or 16-bit. These carry no patient
  geometry, so their pixels are 1 mm apart with the origin at 0 and identity directions. Alpha
  channels are dropped, palette images become RGB (or grayscale when the palette is gray), each
  with a note in ``Volume.notes``.

What is written (:func:`write_labels`): a Slicer ``.seg.nrrd`` with named, coloured segments, a
labelmap (``.nrrd``, ``.nii``, ``.nii.gz``, ``.mha``) or, for 2D images, a PNG label image. Every
write goes to a temporary file in the target folder that is renamed at the end, so a failed
write leaves nothing behind.
"""

from __future__ import annotations

import colorsys
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk
from PIL import Image

from .errors import InputError

PathLike = Union[str, "os.PathLike[str]"]

#: 2D picture formats read through Pillow (and SimpleITK for their pixels where it keeps 16 bits).
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
#: Label outputs: ``.seg.nrrd`` (Slicer segmentation), ``.png`` (2D only), and SimpleITK labelmaps.
LABELMAP_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")
OUTPUT_SUFFIXES = (".seg.nrrd", ".png", *LABELMAP_SUFFIXES)
#: Geometry of a label file must equal its image's within this (mm for origin and spacing, cosines
#: for direction); NIfTI stores float32, which is why it is not exact.
GEOMETRY_TOLERANCE = 1e-4

# Pillow modes whose pixels Pillow must convert (palette, bilevel, other colour spaces, gray + alpha
# which SimpleITK cannot read); every other mode is read by SimpleITK, which keeps 16-bit RGB.
_PILLOW_MODES = {"P", "PA", "1", "LA", "La", "CMYK", "YCbCr", "LAB", "HSV", "RGBa", "RGBX"}


@dataclass
class Volume:
    """An image as the engine sees it, with the geometry its outputs must keep.

    ``array`` is (k, j, i) grayscale or (k, j, i, 3) RGB, in the file's own dtype.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def rgb(self) -> bool:
        return self.array.ndim == 4 and self.array.shape[-1] == 3

    @property
    def size(self) -> tuple[int, int, int]:
        """(i, j, k): the order of SimpleITK's ``GetSize`` and of the prompt document."""
        k, j, i = self.array.shape[:3]
        return (int(i), int(j), int(k))

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix from voxel (i, j, k) to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(self.direction, dtype=np.float64) * np.asarray(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix


# ------------------------------------------------------------------ reading


def _suffix(path: Path) -> str:
    """Lower-case extension, with the two-part ones (``.seg.nrrd``, ``.nii.gz``) kept whole."""
    name = path.name.lower()
    for double in (".seg.nrrd", ".nii.gz"):
        if name.endswith(double):
            return double
    return path.suffix.lower()


def _sitk_message(err: Exception) -> str:
    """SimpleITK errors start with a source file and line; keep the part a user can act on."""
    text = str(err)
    if "ERROR:" in text:
        text = text.split("ERROR:", 1)[1]
    return " ".join(text.split())[:300]


def _make_volume(array: np.ndarray, spacing, origin, direction, notes: list[str], what: str) -> Volume:
    """Check what every reader must check, then build the :class:`Volume`.

    ``array`` is (k, j, i) or (k, j, i, C) with C in 1..4; a fourth channel is alpha and is dropped.
    """
    if array.ndim == 4:
        channels = array.shape[-1]
        if channels == 1:
            array = array[..., 0]
        elif channels == 2:
            raise InputError(f"{what} has 2 values per voxel (a vector field or grayscale + alpha); "
                             "give a grayscale or RGB image")
        elif channels == 4:
            array = array[..., :3]
            notes.append("alpha channel dropped (the image is used as if opaque)")
        elif channels != 3:
            raise InputError(f"{what} has {channels} values per voxel; give a grayscale or RGB image")
    if np.iscomplexobj(array):
        raise InputError(f"{what} has complex pixel values; give a real-valued image")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    k, j, i = array.shape[:3]
    if i < 2 or j < 2:
        raise InputError(f"{what} is {i}x{j} pixels: too small to segment")
    return Volume(array=array, spacing=tuple(float(v) for v in spacing), origin=tuple(float(v) for v in origin),
                  direction=np.asarray(direction, dtype=np.float64).reshape(3, 3), notes=notes)


def _volume_from_sitk(image: sitk.Image, what: str, notes: list[str]) -> Volume:
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dimension = 3
        notes.append("4D image with a single time point read as 3D")
    if dimension not in (2, 3):
        size = "x".join(str(s) for s in image.GetSize())
        raise InputError(f"{what} is {dimension}D (size {size}); give a 2D image or a 3D volume")
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError(f"{what} has complex pixel values; give a real-valued image")
    array = sitk.GetArrayFromImage(image)
    if dimension == 2:
        array = array[None]
        sx, sy = image.GetSpacing()
        ox, oy = image.GetOrigin()
        d = np.asarray(image.GetDirection()).reshape(2, 2)
        direction = np.eye(3)
        direction[:2, :2] = d
        spacing, origin = (sx, sy, 1.0), (ox, oy, 0.0)
    else:
        spacing, origin = image.GetSpacing(), image.GetOrigin()
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return _make_volume(array, spacing, origin, direction, notes, what)


def _read_raster(path: Path) -> Volume:
    """PNG, JPEG, TIFF, BMP or GIF -> one-slice volume in pixel geometry."""
    what = path.name
    notes: list[str] = []
    try:
        with Image.open(path) as picture:
            frames = int(getattr(picture, "n_frames", 1))
            if frames > 1:
                raise InputError(f"{what} has {frames} frames (an animated or multi-page image); "
                                 "give a single 2D image")
            mode = picture.mode
            bands = len(picture.getbands())
            array = _convert_with_pillow(picture, notes) if mode in _PILLOW_MODES else None
    except InputError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"cannot read {what} as an image: {err}") from None
    if array is None:
        array = _read_picture_pixels(path, bands)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        array = array[None]
        if array.shape[-1] == 2:  # gray + alpha
            array = array[..., :1]
            notes.append("alpha channel dropped (the image is used as if opaque)")
    else:
        raise InputError(f"{what} has an unexpected pixel layout {array.shape}")
    # Picture formats have no patient geometry: 1 mm pixels, origin 0, identity directions.
    return _make_volume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), notes, what)


def _read_picture_pixels(path: Path, bands: int) -> np.ndarray:
    """Pixels of a gray, RGB or RGBA picture at full depth.

    SimpleITK keeps 16-bit RGB, which Pillow silently reduces to 8 bits; but SimpleITK expands
    some 8-bit gray files (a BMP with a gray palette) to RGB. Its answer is used when its channel
    count agrees with Pillow's, and Pillow's otherwise.
    """
    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        if (array.shape[-1] if array.ndim == 3 else 1) == bands:
            return array
    except RuntimeError:
        pass  # a TIFF compression ITK lacks, for instance: Pillow reads it
    with Image.open(path) as picture:
        return np.asarray(picture)


def _convert_with_pillow(picture: Image.Image, notes: list[str]) -> np.ndarray:
    """Pixels of the modes SimpleITK misreads: palette, bilevel, gray + alpha, CMYK and friends."""
    mode = picture.mode
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in picture.info
        rgb = np.asarray(picture.convert("RGBA" if has_alpha else "RGB"))
        if has_alpha:
            notes.append("alpha channel dropped (the image is used as if opaque)")
            rgb = rgb[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            notes.append("palette image with a gray palette read as grayscale")
            return rgb[..., 0].copy()
        notes.append("palette image converted to RGB")
        return rgb
    if mode == "1":
        notes.append("1-bit image read as grayscale 0/255")
        return np.asarray(picture.convert("L"))
    if mode in ("LA", "La"):
        return np.asarray(picture.convert("LA"))  # (H, W, 2); the caller drops alpha with a note
    if mode == "RGBX":
        return np.asarray(picture.convert("RGB"))
    notes.append(f"{mode} image converted to RGB")
    return np.asarray(picture.convert("RGB"))


def _read_dicom_folder(folder: Path) -> Volume:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"folder {folder} holds no DICOM series; give an image file or a DICOM series folder")
    if len(series) > 1:
        listing = "; ".join(_describe_series(folder, uid) for uid in series)
        raise InputError(f"folder {folder} holds {len(series)} DICOM series; put the one to segment in its own "
                         f"folder. Series: {listing}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise InputError(f"cannot read the DICOM series in {folder}: {_sitk_message(err)}") from None
    return _volume_from_sitk(image, f"DICOM series in {folder}", [])


def _describe_series(folder: Path, uid: str) -> str:
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    description = ""
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        reader.ReadImageInformation()
        if reader.HasMetaDataKey("0008|103e"):
            description = reader.GetMetaData("0008|103e").strip()
    except RuntimeError:
        pass  # the description only decorates the message
    label = f" '{description}'" if description else ""
    return f"{uid}{label} ({len(files)} files)"


def read_image(path: PathLike) -> Volume:
    """Read an image file or a DICOM series folder into a :class:`Volume`.

    Raises InputError for a missing path, an unreadable file, an animated or multi-page picture,
    4D or 2-channel data, an image smaller than 2x2 pixels, and a folder with zero or several
    DICOM series (the message lists them).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"image {path} does not exist")
    if path.is_dir():
        return _read_dicom_folder(path)
    if _suffix(path) in RASTER_SUFFIXES:
        return _read_raster(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(f"cannot read {path.name} as an image: {_sitk_message(err)}") from None
    return _volume_from_sitk(image, path.name, [])


# ------------------------------------------------------------------ label files


def _check_geometry(what: str, spacing, origin, direction, reference: Volume) -> None:
    """Raise InputError naming the first geometry field that differs from ``reference``'s."""
    checks = (
        ("spacing", np.asarray(spacing, float), np.asarray(reference.spacing, float)),
        ("origin", np.asarray(origin, float), np.asarray(reference.origin, float)),
        ("direction", np.asarray(direction, float).reshape(3, 3), np.asarray(reference.direction, float)),
    )
    for name, theirs, ours in checks:
        if not np.allclose(theirs, ours, rtol=0.0, atol=GEOMETRY_TOLERANCE):
            raise InputError(f"{what} has {name} {np.round(theirs, 6).tolist()} but the image has "
                             f"{np.round(ours, 6).tolist()}: labels must lie on the image's grid")


def _as_label_array(array: np.ndarray, what: str) -> np.ndarray:
    """Integer labels >= 0; integral floats (as NIfTI often stores them) are accepted."""
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(np.mod(array, 1) == 0):
            raise InputError(f"{what} holds non-integer values: a labelmap holds whole label numbers")
        array = array.astype(np.int64)
    elif not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise InputError(f"{what} has pixel type {array.dtype}: a labelmap holds whole label numbers")
    if array.size and array.min() < 0:
        raise InputError(f"{what} holds negative labels (min {array.min()})")
    maximum = int(array.max()) if array.size else 0
    return array.astype(_label_dtype(maximum), copy=False)


def _label_dtype(maximum: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if maximum <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise InputError(f"label {maximum} is too large")


def _is_slicer_segmentation(path: Path) -> bool:
    if _suffix(path) == ".seg.nrrd":
        return True
    if _suffix(path) != ".nrrd":
        return False
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception:  # not a readable NRRD header: SimpleITK will say what is wrong
        return False
    return any(key.startswith("Segment0_") for key in header)


def _read_slicer_segmentation(path: Path, reference: Volume) -> tuple[np.ndarray, dict[int, str]]:
    """A Slicer ``.seg.nrrd`` -> labels on the reference grid.

    Slicer writes only the extent that holds segments: the file's origin is that block's first
    voxel and ``Segmentation_ReferenceImageExtentOffset`` its index in the full grid, so the block
    is placed by its physical origin and padded with zeros (what Slicer's reader does). Each
    segment keeps its ``labelValue`` when those are unique; with overlapping layers they may repeat,
    and then segments are numbered 1..N in file order. Where layers overlap, the later segment wins.
    """
    import slicerio

    what = path.name
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as err:  # slicerio raises plain exceptions of several types
        raise InputError(f"cannot read {what} as a Slicer segmentation: {err}") from None
    voxels = np.asarray(segmentation["voxels"])
    layers = voxels[None] if voxels.ndim == 3 else voxels
    if layers.ndim != 4:
        raise InputError(f"{what} has a {voxels.ndim}D voxel array; a segmentation is 3D (or 4D with layers)")
    ijk_to_lps = np.asarray(segmentation["ijkToLPS"], dtype=np.float64)
    columns = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing == 0):
        raise InputError(f"{what} has a zero voxel spacing")
    reference_grid = np.asarray(reference.direction) * np.asarray(reference.spacing)
    _check_geometry(what, spacing, reference.origin, columns / spacing, reference)
    # Where the file's first voxel lies in the reference grid, in voxel indices (i, j, k).
    offset = np.linalg.solve(reference_grid, ijk_to_lps[:3, 3] - np.asarray(reference.origin))
    whole = np.rint(offset)
    placed_origin = np.asarray(reference.origin) + reference_grid @ whole
    if not np.allclose(placed_origin, ijk_to_lps[:3, 3], rtol=0.0, atol=GEOMETRY_TOLERANCE):
        raise InputError(f"{what} has origin {np.round(ijk_to_lps[:3, 3], 6).tolist()}, which is not on the "
                         f"image's voxel grid (origin {list(reference.origin)})")
    start = whole.astype(int)
    block = np.array(layers.shape[1:])  # (i, j, k)
    size = np.array(reference.size)
    if np.any(start < 0) or np.any(start + block > size):
        raise InputError(f"{what} covers voxels {start.tolist()} to {(start + block - 1).tolist()}, outside the "
                         f"image's {size.tolist()} voxels")

    segments = segmentation.get("segments", [])
    values = [int(s.get("labelValue", 1)) for s in segments]
    if len(set(values)) != len(values):
        values = list(range(1, len(segments) + 1))
    labels_ijk = np.zeros(tuple(size), dtype=_label_dtype(max(values, default=0)))
    window = tuple(slice(a, a + b) for a, b in zip(start, block, strict=True))
    names: dict[int, str] = {}
    for segment, value in zip(segments, values, strict=True):
        mask = layers[int(segment.get("layer", 0))] == int(segment.get("labelValue", 1))
        labels_ijk[window][mask] = value
        names[value] = str(segment.get("name", segment.get("id", f"label {value}")))
    return np.ascontiguousarray(labels_ijk.transpose(2, 1, 0)), names


def read_labels(path: PathLike, reference: Volume) -> tuple[np.ndarray, dict[int, str]]:
    """Read a labelmap or a Slicer segmentation that belongs to ``reference``.

    Returns (k, j, i) integer labels on the reference grid and ``{label: name}`` for every segment
    (a plain labelmap names each label it holds ``"label N"``). Size, spacing, origin and direction
    must match the reference within :data:`GEOMETRY_TOLERANCE`; 2D picture formats carry no
    geometry, so only their size is compared. Anything else is an InputError naming the mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"label file {path} does not exist")
    what = path.name
    if _is_slicer_segmentation(path):
        return _read_slicer_segmentation(path, reference)
    if _suffix(path) in RASTER_SUFFIXES:
        array = _read_raster_labels(path)[None]
        size = (array.shape[2], array.shape[1], array.shape[0])
        if size != reference.size:
            raise InputError(f"{what} has size {list(size)} but the image has {list(reference.size)}")
        return _labels_and_names(array, what)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(f"cannot read {what} as a labelmap: {_sitk_message(err)}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} has {image.GetNumberOfComponentsPerPixel()} values per voxel: "
                         "a labelmap has one")
    if image.GetDimension() not in (2, 3):
        raise InputError(f"{what} is {image.GetDimension()}D: a labelmap is 2D or 3D")
    array = sitk.GetArrayFromImage(image)
    if array.ndim == 2:
        array = array[None]
    size = (array.shape[2], array.shape[1], array.shape[0])
    if size != reference.size:
        raise InputError(f"{what} has size {list(size)} but the image has {list(reference.size)}")
    if image.GetDimension() == 3:
        spacing, origin = image.GetSpacing(), image.GetOrigin()
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
    else:  # a 2D labelmap of a one-slice image: the third axis is the image's
        spacing = (*image.GetSpacing(), reference.spacing[2])
        origin = (*image.GetOrigin(), reference.origin[2])
        direction = np.eye(3)
        direction[:2, :2] = np.asarray(image.GetDirection()).reshape(2, 2)
    _check_geometry(what, spacing, origin, direction, reference)
    return _labels_and_names(array, what)


def _labels_and_names(array: np.ndarray, what: str) -> tuple[np.ndarray, dict[int, str]]:
    labels = _as_label_array(array, what)
    return labels, {int(v): f"label {int(v)}" for v in np.unique(labels) if v != 0}


def _read_raster_labels(path: Path) -> np.ndarray:
    """A PNG/TIFF/... label image -> (rows, cols) labels; a palette image's indices are its labels."""
    try:
        with Image.open(path) as picture:
            if int(getattr(picture, "n_frames", 1)) > 1:
                raise InputError(f"{path.name} has several frames: a label image is one 2D picture")
            if picture.mode not in ("L", "P", "1", "I", "F", "I;16", "I;16B", "I;16L"):
                raise InputError(f"{path.name} is a {picture.mode} picture: a label image has one value per pixel")
            return np.asarray(picture)
    except InputError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"cannot read {path.name} as a label image: {err}") from None


# ------------------------------------------------------------------ writing

#: Distinct segment colours (r, g, b in 0..1), our own choice: saturated, told apart on CT and RGB alike.
_COLOURS = (
    (0.90, 0.30, 0.25),  # red
    (0.25, 0.55, 0.90),  # blue
    (0.30, 0.75, 0.35),  # green
    (0.95, 0.78, 0.20),  # yellow
    (0.65, 0.40, 0.85),  # purple
    (0.20, 0.80, 0.80),  # cyan
    (0.95, 0.55, 0.20),  # orange
    (0.90, 0.45, 0.70),  # pink
    (0.55, 0.35, 0.20),  # brown
    (0.60, 0.85, 0.30),  # lime
    (0.35, 0.35, 0.75),  # indigo
    (0.75, 0.75, 0.75),  # grey
)


def segment_colour(index: int) -> tuple[float, float, float]:
    """Colour of the segment at 0-based ``index``: a fixed table, then hues a golden angle apart."""
    if index < 0:
        raise ValueError(f"segment index must be >= 0, got {index}")
    if index < len(_COLOURS):
        return _COLOURS[index]
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.9)
    return (round(r, 4), round(g, 4), round(b, 4))


def _check_segments(labels: np.ndarray, segments: Sequence[tuple[str, int, tuple[float, float, float]]]) -> None:
    seen: set[int] = set()
    for name, label, colour in segments:
        if not str(name).strip() or any(c in str(name) for c in "\r\n"):
            raise InputError(f"segment name {name!r} must be non-empty text on one line")
        if not isinstance(label, (int, np.integer)) or not 1 <= int(label) <= 65535:
            raise InputError(f"segment {name!r}: label must be an integer in 1..65535, got {label!r}")
        if int(label) in seen:
            raise InputError(f"segment {name!r}: label {label} is used by two segments")
        seen.add(int(label))
        if len(colour) != 3 or not all(0.0 <= float(c) <= 1.0 for c in colour):
            raise InputError(f"segment {name!r}: colour must be three values in 0..1, got {colour!r}")
    present = {int(v) for v in np.unique(labels)} - {0}
    unnamed = sorted(present - seen)
    if unnamed:
        raise InputError(f"labels {unnamed} appear in the label array but in no segment")


def _output_suffix(path: Path) -> str:
    suffix = _suffix(path)
    if suffix not in OUTPUT_SUFFIXES:
        raise InputError(f"cannot write labels to {path.name}: the output must end in "
                         f"{', '.join(OUTPUT_SUFFIXES)}")
    return suffix


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _write_labelmap(tmp: Path, labels: np.ndarray, reference: Volume) -> None:
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing(reference.spacing)
    image.SetOrigin(reference.origin)
    image.SetDirection(np.asarray(reference.direction, dtype=np.float64).ravel().tolist())
    sitk.WriteImage(image, str(tmp), useCompression=True)


def _write_png(tmp: Path, labels: np.ndarray) -> None:
    Image.fromarray(np.ascontiguousarray(labels[0], dtype=np.uint8), mode="L").save(tmp, format="PNG")


def _slicer_geometry_string(reference: Volume) -> str:
    """Slicer's serialised image geometry: the IJK-to-RAS matrix row by row, then the extent."""
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ reference.ijk_to_lps()
    i, j, k = reference.size
    values = [f"{v:.17g}" for v in ijk_to_ras.ravel()] + [str(v) for v in (0, i - 1, 0, j - 1, 0, k - 1)]
    return ";".join(values) + ";"


def _write_seg_nrrd(tmp: Path, labels: np.ndarray, reference: Volume,
                    segments: Sequence[tuple[str, int, tuple[float, float, float]]]) -> None:
    import slicerio

    segmentation = {
        "voxels": labels.transpose(2, 1, 0),  # slicerio wants (i, j, k); written in Fortran order, no copy
        "ijkToLPS": reference.ijk_to_lps(),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        # The grid Slicer edits the segmentation on. Written as the raw header field (slicerio copies
        # unknown keys verbatim) because Slicer only parses parameters that end with "&", which
        # slicerio's own "conversionParameters" writer leaves off the last one.
        "Segmentation_ConversionParameters": "Reference image geometry|" + _slicer_geometry_string(reference)
        + "|Image geometry description string determining the geometry of the labelmap that is created in "
        "course of conversion.&",
        "segments": [
            {"id": f"Segment_{int(label)}", "name": str(name), "nameAutoGenerated": False,
             "color": [float(c) for c in colour], "colorAutoGenerated": False,
             "labelValue": int(label), "layer": 0}
            for name, label, colour in segments
        ],
    }
    # Level 1: labelmaps compress well even so, and level 9 costs seconds on a full CT.
    slicerio.write_segmentation(str(tmp), segmentation, compression_level=1)


def write_labels(
    path: PathLike,
    labels: np.ndarray,
    reference: Volume,
    segments: Sequence[tuple[str, int, tuple[float, float, float]]],
    *,
    input_path: Optional[PathLike] = None,
) -> Path:
    """Write (k, j, i) integer ``labels`` on ``reference``'s grid to ``path``; return the path written.

    ``segments`` are (name, label, (r, g, b) in 0..1). The output kind follows the extension:
    ``.seg.nrrd`` a Slicer segmentation with named, coloured segments; ``.png`` a uint8 label
    image (2D images only); ``.nrrd``, ``.nii``, ``.nii.gz``, ``.mha`` a labelmap. The output has
    the reference's origin, spacing and direction (a PNG has none). ``input_path``, when given, is
    the image the labels came from: writing over it is refused. Everything is checked before the
    first byte is written; the file appears only once complete (temporary name, then rename).
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output {path} is a folder; give a file name ending in {', '.join(OUTPUT_SUFFIXES)}")
    suffix = _output_suffix(path)
    if input_path is not None and (_same_file(path, Path(input_path))
                                   or path.resolve() == Path(input_path).resolve()):
        raise InputError(f"refusing to write the labels over the input image {input_path}")
    labels = np.asarray(labels)
    expected = reference.array.shape[:3]
    if labels.shape != expected:
        raise InputError(f"labels have shape {labels.shape} but the image is (k, j, i) = {expected}")
    labels = _as_label_array(labels, "the label array")
    _check_segments(labels, segments)
    if suffix == ".png":
        if labels.shape[0] != 1:
            raise InputError(f"a PNG label image holds one 2D slice but the image has {labels.shape[0]} slices; "
                             f"write {', '.join(('.seg.nrrd', *LABELMAP_SUFFIXES))} instead")
        if labels.size and labels.max() > 255:
            raise InputError(f"a PNG label image holds labels up to 255, got {int(labels.max())}")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the output folder {path.parent}: {err.strerror}") from None
    # Same folder (so the rename is atomic) and same ending (writers pick the format by extension).
    tmp = path.parent / f".tmp-{secrets.token_hex(4)}-{path.name}"
    try:
        if suffix == ".seg.nrrd":
            _write_seg_nrrd(tmp, labels, reference, segments)
        elif suffix == ".png":
            _write_png(tmp, labels)
        else:
            _write_labelmap(tmp, labels, reference)
        os.replace(tmp, path)
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}") from None
    except RuntimeError as err:
        raise InputError(f"cannot write {path}: {_sitk_message(err)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path
