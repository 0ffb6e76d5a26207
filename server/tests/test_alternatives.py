"""The decoder's other mask outputs (SAM's mask tokens 1..3) on real CT slices: torch and ONNX agree, the
model's own mask (token 0) is what it was, and the ONNX graph is exported once beside the others.

The ONNX tests point the user cache at a temporary folder (``MEDSAM_CACHE_DIR``), as test_onnx does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_data import ct_lung_slices, dice
from medsam_server.models import load_model
from medsam_server.models import onnx_backend as ob
from medsam_server.models.alternatives import ALTERNATIVES_PREFIX, alternatives_file
from medsam_server.models.torch_runtime import AlternativeMaskDecoder

SHAPE = (128, 128)


@pytest.fixture(scope="module")
def ct_pairs(litemedsam):
    """Embeddings and boxes of both lungs on three real CT slices (six pairs)."""
    slices, boxes, reference = ct_lung_slices()
    pairs = np.repeat(np.arange(len(slices)), 2)
    return litemedsam.embed(slices)[pairs], boxes.reshape(-1, 4), reference.reshape(-1, *SHAPE)


def test_token_zero_of_the_alternatives_module_is_the_models_mask(litemedsam, ct_pairs):
    embeddings, boxes, _ = ct_pairs
    before = litemedsam.decode(embeddings, boxes, SHAPE)
    alternatives = litemedsam.decode_alternatives(embeddings, boxes, SHAPE)
    assert alternatives.shape == (len(boxes), 3, *SHAPE) and alternatives.dtype == np.float32
    # the default path is untouched: the same probabilities, bit for bit, after the alternatives ran
    assert np.array_equal(litemedsam.decode(embeddings, boxes, SHAPE), before)
    runtime = litemedsam.runtime
    coords, labels = litemedsam._prompt_input(embeddings, boxes, SHAPE, None, None)
    every = AlternativeMaskDecoder(runtime.decoder.prompt_encoder, runtime.decoder.mask_decoder, (0, 1, 2, 3)).eval()
    with torch.inference_mode():
        logits = every(torch.from_numpy(embeddings), torch.from_numpy(coords.astype(np.float32)),
                       torch.from_numpy(labels.astype(np.int64))).numpy()
    assert np.abs(logits[:, :1] - runtime.decode(embeddings, coords, labels)).max() < 1e-4
    assert np.abs(logits[:, 1:] - runtime.decode_alternatives(embeddings, coords, labels)).max() < 1e-4


def test_the_alternatives_are_other_masks_of_the_same_lung(litemedsam, ct_pairs):
    embeddings, boxes, reference = ct_pairs
    own = litemedsam.decode(embeddings, boxes, SHAPE) > 0.5
    alternatives = litemedsam.decode_alternatives(embeddings, boxes, SHAPE) > 0.5
    # each token gives its own mask (not a copy of token 0) inside the same box
    for token in range(3):
        assert min(dice(a, m) for a, m in zip(alternatives[:, token], own, strict=True)) < 0.999
    best = [max(dice(m, r) for m in (o, *a)) for o, a, r in zip(own, alternatives, reference, strict=True)]
    assert min(best) > 0.6


def test_onnx_alternatives_match_torch_and_keep_the_other_graphs(litemedsam, lite_onnx, ct_pairs, onnx_cache):
    embeddings, boxes, _ = ct_pairs
    folder = ob.graph_folder("litemedsam")
    graphs = [folder / ob.ENCODER_FILE, folder / ob.DECODER_FILE]
    stamps = [f.stat().st_mtime_ns for f in graphs]
    own = lite_onnx.decode(embeddings, boxes, SHAPE)
    p_onnx = lite_onnx.decode_alternatives(embeddings, boxes, SHAPE)
    p_torch = litemedsam.decode_alternatives(embeddings, boxes, SHAPE)
    assert p_onnx.shape == p_torch.shape == (len(boxes), 3, *SHAPE)
    assert np.abs(p_onnx - p_torch).max() <= 1e-3
    assert min(dice(a > 0.5, b > 0.5) for a, b in zip(p_onnx.reshape(-1, *SHAPE), p_torch.reshape(-1, *SHAPE),
                                                    strict=True)) >= 0.999
    # exported on first use beside the other two, which are untouched (their folder key did not change)
    assert [f.stat().st_mtime_ns for f in graphs] == stamps
    assert sorted(p.name for p in folder.iterdir()) == sorted([alternatives_file(), "decoder.onnx", "encoder.onnx",
                                                               ob.PREPARE_FILE, ob.PROMPT_FILE, "manifest.json"])
    assert alternatives_file().startswith(ALTERNATIVES_PREFIX)
    assert np.array_equal(lite_onnx.decode(embeddings, boxes, SHAPE), own)


def test_a_second_onnx_runtime_reuses_the_alternatives_graph_and_an_old_key_is_replaced(lite_onnx, ct_pairs,
                                                                                        onnx_cache):
    embeddings, boxes, _ = ct_pairs
    lite_onnx.decode_alternatives(embeddings[:1], boxes[:1], SHAPE)  # exported (here or by the test before)
    folder = ob.graph_folder("litemedsam")
    path = folder / alternatives_file()
    stamp = path.stat().st_mtime_ns
    again = load_model("litemedsam", device="cpu", backend="onnx")
    first = again.decode_alternatives(embeddings[:1], boxes[:1], SHAPE)
    assert path.stat().st_mtime_ns == stamp  # found, not exported again
    # A graph of an older key (the class's code changed) is replaced by the export of the current one.
    stale = folder / f"{ALTERNATIVES_PREFIX}0000000000000000.onnx"
    stale.write_bytes(b"old")
    path.unlink()
    third = load_model("litemedsam", device="cpu", backend="onnx")
    assert np.array_equal(third.decode_alternatives(embeddings[:1], boxes[:1], SHAPE), first)
    assert not stale.exists() and path.is_file()
