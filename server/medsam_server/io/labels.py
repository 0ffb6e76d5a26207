"""Label files: reading a labelmap or segmentation onto an image's grid, and writing labels in every output format.

Frames as in :mod:`.images`: label arrays are (k, j, i); spacing and origin (i, j, k), LPS mm;
direction the (3, 3) LPS matrix whose columns are the i, j, k axes.

A :class:`LabelFile` is what any label file holds: one or more layers of integer voxels
(a ``.seg.nrrd`` may hold overlapping segments in several layers) and which (layer, value)
is each label. ``evaluate`` scores its masks; :func:`read_labels` flattens it onto an image.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk
from PIL import Image

from ..errors import InputError
from ..protocol import MAX_LABEL
from .images import RASTER_SUFFIXES, PathLike, Volume, sitk_message, suffix

#: Label outputs: ``.seg.nrrd`` (Slicer segmentation), ``.png`` (2D only), and SimpleITK labelmaps.
LABELMAP_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")
OUTPUT_SUFFIXES = (".seg.nrrd", ".png", *LABELMAP_SUFFIXES)
#: Geometry of a label file must equal its image's within this (mm for origin and spacing, cosines
#: for direction); NIfTI stores float32, which is why it is not exact.
GEOMETRY_TOLERANCE = 1e-4


@dataclass
class LabelFile:
    """A label file as read: ``layers`` (L, k, j, i) integers; ``labels`` maps each label to its (layer, value).

    ``spacing`` and ``origin`` are (i, j, k); ``dimension`` is 2 for a 2D file (k = 1).
    ``cropped``: a ``.seg.nrrd`` block, which Slicer crops to its segments; :meth:`placed_on`
    pads it onto the full grid.
    """

    path: str
    layers: np.ndarray
    labels: dict[int, tuple[int, int]]
    names: dict[int, str]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    dimension: int = 3
    cropped: bool = False

    @property
    def size(self) -> tuple[int, int, int]:
        k, j, i = self.layers.shape[1:]
        return int(i), int(j), int(k)

    @property
    def defined(self) -> set[int]:
        return set(self.labels)

    def mask(self, label: int) -> np.ndarray:
        """Boolean mask (k, j, i) of ``label``; all False when the file has no such label."""
        if label not in self.labels:
            return np.zeros(self.layers.shape[1:], dtype=bool)
        layer, value = self.labels[label]
        return self.layers[layer] == value

    def describe(self, label: int) -> str:
        name = self.names.get(label)
        return f"{label} ({name})" if name else str(label)

    def flattened(self) -> np.ndarray:
        """One (k, j, i) labelmap; where layers overlap, the later segment wins."""
        if len(self.layers) == 1 and all(value == label for label, (_, value) in self.labels.items()):
            return _as_label_array(self.layers[0], Path(self.path).name)
        out = np.zeros(self.layers.shape[1:], dtype=_label_dtype(max(self.labels, default=0)))
        for label in self.labels:
            out[self.mask(label)] = label
        return out

    def placed_on(self, reference: Volume) -> LabelFile:
        """This (cropped) block padded with zeros onto ``reference``'s grid, placed by its physical origin."""
        what = Path(self.path).name
        _check_geometry(what, self.spacing, reference.origin, self.direction, reference)
        grid = np.asarray(reference.direction) * np.asarray(reference.spacing)
        whole = np.rint(np.linalg.solve(grid, np.asarray(self.origin) - np.asarray(reference.origin)))
        if not np.allclose(np.asarray(reference.origin) + grid @ whole, self.origin, rtol=0.0,
                           atol=GEOMETRY_TOLERANCE):
            raise InputError(f"{what} has origin {np.round(self.origin, 6).tolist()}, which is not on the "
                             f"image's voxel grid (origin {list(reference.origin)})")
        start, block, size = whole.astype(int), np.array(self.size), np.array(reference.size)
        if np.any(start < 0) or np.any(start + block > size):
            raise InputError(f"{what} covers voxels {start.tolist()} to {(start + block - 1).tolist()}, outside "
                             f"the image's {size.tolist()} voxels")
        layers = np.zeros((len(self.layers), *reference.array.shape[:3]), dtype=self.layers.dtype)
        layers[(slice(None), *(slice(a, a + b) for a, b in zip(start[::-1], block[::-1], strict=True)))] = self.layers
        return LabelFile(self.path, layers, self.labels, self.names, reference.spacing, reference.origin,
                         np.asarray(reference.direction), self.dimension, cropped=False)


# ------------------------------------------------------------------ reading


def read_label_file(path: PathLike) -> LabelFile:
    """Read a Slicer ``.seg.nrrd``, a 2D label picture, or any labelmap SimpleITK reads."""
    from . import segnrrd

    path = Path(path)
    if not path.is_file():
        raise InputError(f"label file {path} does not exist")
    if segnrrd.is_segmentation(path):
        return segnrrd.read(path)
    if suffix(path) in RASTER_SUFFIXES:
        array = _as_label_array(_read_raster_labels(path), path.name)
        return _label_file(path, array[None], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), 2)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(f"cannot read {path.name} as a labelmap: {sitk_message(err)}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path.name} has {image.GetNumberOfComponentsPerPixel()} values per voxel: "
                         "a labelmap has one")
    if image.GetDimension() not in (2, 3):
        raise InputError(f"{path.name} is {image.GetDimension()}D: a labelmap is 2D or 3D")
    array = _as_label_array(sitk.GetArrayFromImage(image), path.name)
    if image.GetDimension() == 3:
        return _label_file(path, array, image.GetSpacing(), image.GetOrigin(),
                           np.asarray(image.GetDirection()).reshape(3, 3), 3)
    direction = np.eye(3)
    direction[:2, :2] = np.asarray(image.GetDirection()).reshape(2, 2)
    return _label_file(path, array[None], (*image.GetSpacing(), 1.0), (*image.GetOrigin(), 0.0), direction, 2)


def _label_file(path: Path, array: np.ndarray, spacing, origin, direction, dimension: int) -> LabelFile:
    present = [int(v) for v in np.unique(array) if v != 0]
    return LabelFile(str(path), array[None], {v: (0, v) for v in present}, {}, tuple(float(s) for s in spacing),
                     tuple(float(o) for o in origin), np.asarray(direction, dtype=np.float64), dimension)


def read_labels(path: PathLike, reference: Volume) -> tuple[np.ndarray, dict[int, str]]:
    """Read a labelmap or a Slicer segmentation that belongs to ``reference``.

    Returns (k, j, i) integer labels on the reference grid and ``{label: name}`` for every segment
    (a plain labelmap names each label it holds ``"label N"``). Size, spacing, origin and direction
    must match the reference within :data:`GEOMETRY_TOLERANCE` (a cropped ``.seg.nrrd`` is first
    placed on the reference grid); 2D picture formats carry no geometry, so only their size is
    compared. Anything else is an InputError naming the mismatch.
    """
    labels = read_label_file(path)
    what = Path(path).name
    if labels.cropped:
        labels = labels.placed_on(reference)
    if labels.size != reference.size:
        raise InputError(f"{what} has size {list(labels.size)} but the image has {list(reference.size)}")
    if suffix(Path(path)) not in RASTER_SUFFIXES:
        spacing, origin = labels.spacing, labels.origin
        if labels.dimension == 2:  # a 2D labelmap of a one-slice image: the third axis is the image's
            spacing, origin = (*spacing[:2], reference.spacing[2]), (*origin[:2], reference.origin[2])
        _check_geometry(what, spacing, origin, labels.direction, reference)
    names = {label: labels.names.get(label, f"label {label}") for label in sorted(labels.labels)}
    return labels.flattened(), names


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
_COLOURS = (  # red, blue, green, yellow, purple, cyan, orange, pink, brown, lime, indigo, grey
    (0.90, 0.30, 0.25), (0.25, 0.55, 0.90), (0.30, 0.75, 0.35), (0.95, 0.78, 0.20), (0.65, 0.40, 0.85),
    (0.20, 0.80, 0.80), (0.95, 0.55, 0.20), (0.90, 0.45, 0.70), (0.55, 0.35, 0.20), (0.60, 0.85, 0.30),
    (0.35, 0.35, 0.75), (0.75, 0.75, 0.75),
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
        if not isinstance(label, (int, np.integer)) or not 1 <= int(label) <= MAX_LABEL:
            raise InputError(f"segment {name!r}: label must be an integer in 1..{MAX_LABEL}, got {label!r}")
        if int(label) in seen:
            raise InputError(f"segment {name!r}: label {label} is used by two segments")
        seen.add(int(label))
        if len(colour) != 3 or not all(0.0 <= float(c) <= 1.0 for c in colour):
            raise InputError(f"segment {name!r}: colour must be three values in 0..1, got {colour!r}")
    present = {int(v) for v in np.unique(labels)} - {0}
    unnamed = sorted(present - seen)
    if unnamed:
        raise InputError(f"labels {unnamed} appear in the label array but in no segment")


def check_output(path: PathLike, input_path: Optional[PathLike] = None, replace: bool = True) -> str:
    """Refuse an output path before any work is done for it; returns its kind (its suffix)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output {path} is a folder; give a file name ending in {', '.join(OUTPUT_SUFFIXES)}")
    kind = _output_suffix(path)
    if input_path is not None and (_same_file(path, Path(input_path))
                                   or path.resolve() == Path(input_path).resolve()):
        raise InputError(f"refusing to write the labels over the input image {input_path}")
    if not replace and os.path.lexists(path):
        raise InputError(f"{path} exists; pass --force to replace it")
    return kind


def _publish(tmp: Path, path: Path, replace: bool) -> None:
    """Give the finished ``tmp`` its name: a rename, or (``replace=False``) a link that fails if ``path`` exists."""
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name exclusively, then fill it
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.replace(tmp, path)


def _output_suffix(path: Path) -> str:
    ending = suffix(path)
    if ending not in OUTPUT_SUFFIXES:
        raise InputError(f"cannot write labels to {path.name}: the output must end in "
                         f"{', '.join(OUTPUT_SUFFIXES)}")
    return ending


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




def write_labels(
    path: PathLike,
    labels: np.ndarray,
    reference: Volume,
    segments: Sequence[tuple[str, int, tuple[float, float, float]]],
    *,
    input_path: Optional[PathLike] = None,
    replace: bool = True,
) -> Path:
    """Write (k, j, i) integer ``labels`` on ``reference``'s grid to ``path``; return the path written.

    ``segments`` are (name, label, (r, g, b) in 0..1). The output kind follows the extension:
    ``.seg.nrrd`` a Slicer segmentation with named, coloured segments; ``.png`` a uint8 label
    image (2D images only); ``.nrrd``, ``.nii``, ``.nii.gz``, ``.mha`` a labelmap. The output has
    the reference's origin, spacing and direction (a PNG has none). ``input_path``, when given, is
    the image the labels came from: writing over it is refused. Everything is checked before the
    first byte is written; the file appears only once complete (temporary name, then rename).
    With ``replace=False`` an existing ``path`` is an error, even one that appeared while the
    labels were computed: the finished file is linked in place, which never replaces.
    """
    from . import segnrrd

    path = Path(path)
    kind = check_output(path, input_path, replace)
    labels = np.asarray(labels)
    expected = reference.array.shape[:3]
    if labels.shape != expected:
        raise InputError(f"labels have shape {labels.shape} but the image is (k, j, i) = {expected}")
    labels = _as_label_array(labels, "the label array")
    _check_segments(labels, segments)
    if kind == ".png":
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
        if kind == ".seg.nrrd":
            segnrrd.write(tmp, labels, reference.ijk_to_lps(), segments)
        elif kind == ".png":
            _write_png(tmp, labels)
        else:
            _write_labelmap(tmp, labels, reference)
        _publish(tmp, path, replace)
    except FileExistsError:
        raise InputError(f"{path} appeared while the labels were computed; it was kept as it is. Pass --force to "
                         "replace it, or choose another output") from None
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}") from None
    except RuntimeError as err:
        raise InputError(f"cannot write {path}: {sitk_message(err)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path
