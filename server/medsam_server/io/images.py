"""Reading images: every file format the command line and the server accept, into a :class:`Volume`.

Frames and conventions (the prompt document's, README "The command line"):
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
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import SimpleITK as sitk
from PIL import Image

from ..errors import InputError

PathLike = Union[str, "os.PathLike[str]"]

#: 2D picture formats read through Pillow (and SimpleITK for their pixels where it keeps 16 bits).
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
#: Single files that may be DICOM objects (many have no extension at all).
DICOM_FILE_SUFFIXES = ("", ".dcm", ".dicom", ".ima")

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
    dicom: Any = None  # io.dicom.DicomSeries when read from a DICOM series folder: what a SEG references

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


def suffix(path: Path) -> str:
    """Lower-case extension, with the two-part ones (``.seg.nrrd``, ``.nii.gz``) kept whole."""
    name = path.name.lower()
    for double in (".seg.nrrd", ".nii.gz"):
        if name.endswith(double):
            return double
    return path.suffix.lower()


def sitk_message(err: Exception) -> str:
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


def _read_dicom_folder(folder: Path, series_uid: Optional[str]) -> Volume:
    from .dicom import read_dicom_series

    image, series = read_dicom_series(folder, series_uid)
    volume = _volume_from_sitk(image, f"DICOM series in {folder}", list(series.notes))
    volume.dicom = series
    return volume


def read_image(path: PathLike, series_uid: Optional[str] = None) -> Volume:
    """Read an image file or a DICOM series folder into a :class:`Volume`.

    Raises InputError for a missing path, an unreadable file, an animated or multi-page picture,
    4D or 2-channel data, an image smaller than 2x2 pixels, and a DICOM folder that is not one
    even stack of image slices (``io.dicom`` says which and why; ``series_uid`` picks one series
    of several). A volume read from a DICOM folder keeps its source in ``Volume.dicom``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"image {path} does not exist")
    if path.is_dir():
        return _read_dicom_folder(path, series_uid)
    if suffix(path) in RASTER_SUFFIXES:
        return _read_raster(path)
    if suffix(path) in DICOM_FILE_SUFFIXES:
        from .dicom import refuse_non_image_file

        refuse_non_image_file(path)  # an SR or SEG would otherwise fail deep inside SimpleITK
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(f"cannot read {path.name} as an image: {sitk_message(err)}") from None
    return _volume_from_sitk(image, path.name, [])


