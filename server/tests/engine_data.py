"""Real inputs for the engine tests: axial slices of slicerio's CTChest4 and the expert's lung boxes.

Slices come in view pixels (canonical_view, lung window) as the engine receives
them; boxes are the inclusive ``[x_min, y_min, x_max, y_max]`` bounding boxes of the
right (label 5) and left (label 6) lung in the same pixels.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from medsam_server.geometry import canonical_view
from medsam_server.intensity import to_uint8

RIGHT_LUNG, LEFT_LUNG = 5, 6
#: Axial slices (k) with both lungs in view; few, since the encoder costs ~1.3 s a slice here.
CT_SLICES = (12, 20, 28)


def slicerio_data(name: str) -> str:
    import slicerio

    return os.path.join(os.path.dirname(slicerio.__file__), "data", name)


@lru_cache(maxsize=1)
def ct_volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CTChest4 as (k, j, i) int32 HU, the expert labelmap in the same order, the 3x3 direction."""
    import SimpleITK as sitk
    import slicerio

    image = sitk.ReadImage(slicerio_data("CTChest4.nrrd"))
    volume = sitk.GetArrayFromImage(image)
    labels = slicerio.read_segmentation(slicerio_data("Segmentation.seg.nrrd"))["voxels"].transpose(2, 1, 0)
    assert labels.shape == volume.shape
    return volume, labels, np.array(image.GetDirection()).reshape(3, 3)


def bounding_box(mask: np.ndarray) -> np.ndarray:
    """Inclusive [x_min, y_min, x_max, y_max] of a 2D mask (x = column, y = row)."""
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float64)


@lru_cache(maxsize=4)
def ct_lung_slices(ks: tuple[int, ...] = CT_SLICES) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """View slices as uint8 (128, 128); boxes (len(ks), 2, 4) and expert masks (len(ks), 2, 128, 128) of
    the right and left lung."""
    volume, labels, direction = ct_volume()
    view = canonical_view(direction, axis=2)
    volume_u8, _ = to_uint8(volume, "ct-lung")
    slices = [np.ascontiguousarray(view.to_view(volume_u8[k])) for k in ks]
    masks = np.array([[view.to_view(labels[k] == lab) for lab in (RIGHT_LUNG, LEFT_LUNG)] for k in ks])
    boxes = np.array([[bounding_box(m) for m in pair] for pair in masks])
    return slices, boxes, masks


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def save_random_vit_b(path, seed: int = 0):
    """A randomly initialised SAM ViT-B (the MedSAM architecture) and its state dict saved at ``path``.

    Stands in for ``medsam_vit_b.pth``, which cannot be downloaded here: the loader,
    the graphs and the speed do not depend on the weights' values.
    """
    import torch
    from segment_anything import sam_model_registry

    torch.manual_seed(seed)
    sam = sam_model_registry["vit_b"](checkpoint=None).eval()
    torch.save(sam.state_dict(), path)
    return sam
