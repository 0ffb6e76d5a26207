"""The fast paths of issue 17 on the real CT: the int8 encoder, the auto backend, a window per segment.

Real LiteMedSAM weights, slicerio's CTChest4 and its expert segmentation; the ONNX graphs
are exported (and the int8 encoder quantized) once into a temporary cache folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine_data import CT_SLICES, ct_lung_slices, ct_volume, dice
from medsam_server.annotate import annotate
from medsam_server.embeddings import EmbeddingCache
from medsam_server.errors import InputError
from medsam_server.models import load_model, resolve_backend
from medsam_server.models.quantize import INT8_ENCODER_FILE
from medsam_server.prompts import parse_prompts
from medsam_server.simulate import bounding_box

THORACIC_SPINE = 3


@pytest.fixture(scope="module")
def fp32(onnx_cache):
    return load_model("litemedsam", device="cpu", backend="onnx")


@pytest.fixture(scope="module")
def int8(onnx_cache):
    return load_model("litemedsam", device="cpu", backend="onnx", precision="int8")


def test_int8_encoder_is_quantized_and_keeps_the_lung_masks(fp32, int8, onnx_cache):
    assert (int8.backend, int8.precision) == ("onnx", "int8")
    int8_files = list(Path(onnx_cache).glob(f"onnx/*/{INT8_ENCODER_FILE}"))
    assert len(int8_files) == 1
    fp32_file = int8_files[0].with_name("encoder.onnx")
    assert int8_files[0].stat().st_size < 0.7 * fp32_file.stat().st_size  # int8 MatMul weights

    slices, boxes, reference = ct_lung_slices()
    e32, e8 = fp32.embed(slices), int8.embed(slices)
    assert 1e-3 < np.abs(e32 - e8).max()  # another encoder indeed...
    assert np.corrcoef(e32.ravel(), e8.ravel())[0, 1] > 0.99  # ...computing nearly the same embeddings
    for n in range(len(slices)):
        for side in range(2):
            m32 = fp32.decode(e32[n:n + 1], boxes[n, side][None], slices[n].shape)[0] > 0.5
            m8 = int8.decode(e8[n:n + 1], boxes[n, side][None], slices[n].shape)[0] > 0.5
            assert dice(m8, m32) >= 0.97, (CT_SLICES[n], side)
            assert dice(m8, reference[n, side]) >= dice(m32, reference[n, side]) - 0.02, (CT_SLICES[n], side)


def test_int8_is_made_once_and_reused(int8, onnx_cache, capsys):
    again = load_model("litemedsam", device="cpu", backend="auto", precision="int8")
    assert again.precision == "int8"
    assert "Quantizing" not in capsys.readouterr().err


def test_int8_needs_the_onnx_backend():
    with pytest.raises(InputError, match="precision int8 runs on the ONNX backend"):
        load_model("litemedsam", device="cpu", backend="torch", precision="int8")
    with pytest.raises(InputError, match="unknown precision 'int4'"):
        load_model("litemedsam", device="cpu", precision="int4")


def test_auto_backend_is_onnx_on_a_cpu():
    assert resolve_backend("auto", "cpu") == "onnx"
    assert resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"


# ------------------------------------------------------------------ a window per segment


def _document(spine_window=None, window="ct-lung") -> dict:
    """Both lungs and the thoracic spine on slices 14..18, boxes from the expert segmentation on 14 and 18."""
    _, labels, _ = ct_volume()
    segments = []
    for name, label in (("right lung", 5), ("left lung", 6), ("thoracic spine", THORACIC_SPINE)):
        segment = {"name": name, "boxes": [{"slice": k, "box": bounding_box(labels[k] == label)} for k in (14, 18)]}
        if label == THORACIC_SPINE and spine_window is not None:
            segment["window"] = spine_window
        segments.append(segment)
    return {"axis": 2, "window": window, "segments": segments}


def test_segment_window_overrides_the_documents_in_one_run(litemedsam):
    volume, labels, direction = ct_volume()
    size = tuple(reversed(volume.shape))
    cache = EmbeddingCache()
    one_run = annotate(volume, direction, parse_prompts(_document("ct-bone"), size), litemedsam, cache)
    # Slices 14..18 encoded once in the lung window (both lungs) and once in the bone window (the spine).
    assert (one_run.cache_misses, one_run.cache_hits) == (10, 5)

    # The same cache: both windows' slices are found again under their own keys.
    bone_only = annotate(volume, direction, parse_prompts(_document(window="ct-bone"), size), litemedsam, cache)
    lung_only = annotate(volume, direction, parse_prompts(_document(), size), litemedsam, cache)
    assert bone_only.cache_misses == lung_only.cache_misses == 0
    spine, lungs = one_run.labels == 3, np.isin(one_run.labels, (1, 2))
    assert np.array_equal(spine, bone_only.labels == 3)  # the spine as a bone-window run sees it
    assert np.array_equal(lungs, np.isin(lung_only.labels, (1, 2)))  # the lungs as a lung-window run does
    assert not np.array_equal(spine, lung_only.labels == 3)  # and the window really changed the spine
    reference = labels[14:19] == THORACIC_SPINE
    assert dice(spine[14:19], reference) > dice(lung_only.labels[14:19] == 3, reference) - 0.05


def test_a_bad_segment_window_names_the_segment():
    volume, _, _ = ct_volume()
    size = tuple(reversed(volume.shape))
    with pytest.raises(InputError, match="segment 'thoracic spine': unknown window 'ct-spine'"):
        parse_prompts(_document("ct-spine"), size)
    with pytest.raises(InputError, match="segment 'thoracic spine': window"):
        parse_prompts(_document([300, 100]), size)
    document = parse_prompts(_document([-200, 1200]), size)
    assert document.window_of(document.segments[2]) == (-200.0, 1200.0)
    assert document.window_of(document.segments[0]) == "ct-lung"


@pytest.mark.parametrize("shape", [(128, 128), (512, 512), (300, 520)])
def test_opencv_upscale_matches_torch_bilinear(litemedsam, shape):
    """The recipe's OpenCV resize against upstream's ``F.interpolate(..., "bilinear", align_corners=False)``."""
    import torch
    import torch.nn.functional as F

    from medsam_server.models.litemedsam import RECIPE, _resized_shape

    slices, boxes, _ = ct_lung_slices()
    embedding = litemedsam.embed(slices[:1])
    coords = RECIPE.coords_to_input(boxes[0, :1].reshape(-1, 2, 2), (128, 128)).astype(np.float32)
    logits = litemedsam.runtime.decode(embedding, coords, np.array([[2, 3]]))
    rows, cols = _resized_shape(shape)
    expected = torch.sigmoid(F.interpolate(torch.from_numpy(logits)[:, :, :rows, :cols], size=shape,
                                           mode="bilinear", align_corners=False))[:, 0].numpy()
    got = RECIPE.logits_to_probabilities(logits, shape)
    assert got.shape == (1, *shape) and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-4
    assert dice(got > 0.5, expected > 0.5) >= 0.999


def test_sigmoid_in_place_matches_expit_and_keeps_the_masks():
    """The post-processing's OpenCV sigmoid against scipy's ``expit`` (what it replaced), extremes and NaN included."""
    import cv2
    from scipy.special import expit

    from medsam_server.models.litemedsam import _resized_shape, logits_to_probabilities, sigmoid_in_place

    logits = (np.random.default_rng(0).standard_normal((2, 1, 256, 256)) * 10).astype(np.float32)
    logits[0, 0, 0, :5] = [1000.0, -1000.0, 0.0, 88.0, np.nan]
    for shape in [(512, 512), (300, 520), (128, 128), (1, 5)]:
        rows, cols = _resized_shape(shape)
        resized = np.stack([cv2.resize(p, shape[::-1], interpolation=cv2.INTER_LINEAR)
                            for p in logits[:, 0, :rows, :cols]])
        expected = expit(resized)
        got = logits_to_probabilities(logits, shape)
        assert got.shape == expected.shape and got.dtype == np.float32
        assert np.array_equal(np.isnan(got), np.isnan(expected))
        assert np.nanmax(np.abs(got - expected)) < 1e-6
        assert np.array_equal(got > 0.5, expected > 0.5)
    values = np.array([1000.0, -1000.0, 0.0, 3.0], dtype=np.float32)
    assert sigmoid_in_place(values) is values
    assert np.abs(values - expit(np.array([1000.0, -1000.0, 0.0, 3.0], dtype=np.float32))).max() < 1e-6
