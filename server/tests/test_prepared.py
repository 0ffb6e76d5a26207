"""The decoder in two steps (``PromptedMaskDecoder.prepare`` + ``decode_prepared``) and the kept first step
(``models/prepared.py``): the same logits as the one graph, on the real LiteMedSAM weights and CT slices, and a
cache that stays small and never gives a slice another's tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_data import RIGHT_LUNG, ct_lung_slices, ct_volume, dice
from medsam_server.embeddings import EmbeddingCache, SliceKey
from medsam_server.models import load_model
from medsam_server.models.litemedsam import RECIPE
from medsam_server.models.prepared import PreparedSlices
from medsam_server.stack import SliceStack
from medsam_server.worker import ModelWorker, WorkerModel

SHAPE = (128, 128)


@pytest.fixture(scope="module")
def ct_prompts(litemedsam):
    """Embeddings (3, 256, 64, 64) of three CT slices; per slice a lung box, and the box with two points, in model
    pixels: coords (3, 2, 2) / (3, 4, 2) and labels."""
    slices, boxes, _ = ct_lung_slices()
    embeddings = litemedsam.embed(slices)
    corners = RECIPE.coords_to_input(boxes[:, 0].reshape(-1, 2, 2), SHAPE).astype(np.float32)
    points = corners.mean(axis=1, keepdims=True) + np.array([[[0.0, 0.0], [0.0, 40.0]]], dtype=np.float32)
    return embeddings, [(corners, np.tile([2, 3], (3, 1))),
                        (np.concatenate([points, corners], axis=1), np.tile([1, 0, 2, 3], (3, 1)))]


def upstream_logits(decoder, embeddings, coords, labels):
    """The decoder as one graph the way it was before the split: upstream's ``TwoWayTransformer`` on the whole
    image (``MaskDecoder.predict_masks`` with embedding i paired with prompt i)."""
    pe, dec = decoder.prompt_encoder, decoder.mask_decoder
    n = embeddings.shape[0]
    tokens = torch.cat([torch.cat([dec.iou_token.weight, dec.mask_tokens.weight]).unsqueeze(0).expand(n, -1, -1),
                        decoder._sparse(coords, labels)], dim=1)
    src = embeddings + pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
    hs, keys = dec.transformer(src, pe.get_dense_pe().expand(n, -1, -1, -1), tokens)
    upscaled = dec.output_upscaling(keys.transpose(1, 2).reshape(src.shape))
    hyper = dec.output_hypernetworks_mlps[0](hs[:, 1, :])
    b, c, h, w = upscaled.shape
    return (hyper.unsqueeze(1) @ upscaled.reshape(b, c, h * w)).reshape(b, 1, h, w)


def test_two_steps_give_upstreams_logits_in_torch(litemedsam, ct_prompts):
    embeddings, cases = ct_prompts
    decoder = litemedsam.runtime.decoder
    for coords, labels in cases:
        args = [torch.from_numpy(a) for a in (embeddings, coords, labels.astype(np.int64))]
        with torch.inference_mode():
            expected = upstream_logits(decoder, *args).numpy()
        got = litemedsam.runtime.decode_prepared(litemedsam.runtime.prepare(embeddings), coords, labels)
        assert got.shape == (3, 1, 256, 256)
        assert np.abs(got - expected).max() < 1e-4
        assert np.abs(litemedsam.runtime.decode(embeddings, coords, labels) - expected).max() < 1e-4


def test_onnx_step_graphs_give_the_one_graph_logits(lite_onnx, ct_prompts):
    embeddings, cases = ct_prompts
    runtime = lite_onnx.runtime
    prepared = runtime.prepare(embeddings)
    assert [t.shape for t in prepared] == [(3, 4096, 256), (3, 8, 16, 4096), (3, 8, 4096, 16), (3, 8, 4096, 16)]
    one_slice = runtime.prepare(embeddings[1:2])  # made alone, as the cache makes them
    for coords, labels in cases:
        one_graph = runtime.decode(embeddings, coords, labels)
        assert np.abs(runtime.decode_prepared(prepared, coords, labels) - one_graph).max() < 1e-4
        alone = runtime.decode_prepared(one_slice, coords[1:2], labels[1:2])
        assert np.abs(alone - one_graph[1:2]).max() < 1e-4
        masks = [RECIPE.logits_to_probabilities(x, SHAPE) > 0.5 for x in (one_graph[1:2], alone)]
        assert dice(*masks) >= 0.999 and masks[0].sum() > 100


def test_a_box_with_keys_decodes_as_without_and_its_slice_step_is_kept(lite_onnx, ct_prompts):
    embeddings, _ = ct_prompts
    _, boxes, _ = ct_lung_slices()
    model = load_model("litemedsam", device="cpu", backend="onnx")  # a cache of its own
    keys = [SliceKey("volume", 2, k, "litemedsam", "ct-lung") for k in range(3)]
    plain = model.decode(embeddings, boxes[:, 0], SHAPE)
    assert model.prepared.stats()["entries"] == 0  # decoding without keys keeps nothing
    first = model.decode(embeddings, boxes[:, 0], SHAPE, keys=keys)
    again = model.decode(embeddings[1:2], boxes[1:2, 1], SHAPE, keys=keys[1:2])  # the other lung, same slice
    assert np.abs(first - plain).max() < 1e-5
    assert np.abs(again - model.decode(embeddings[1:2], boxes[1:2, 1], SHAPE)).max() < 1e-5
    assert model.prepared.stats() | {"bytes": 0} == {"hits": 1, "misses": 3, "entries": 3, "bytes": 0,
                                                     "budget_bytes": 64 << 20}
    # a slice given twice in one call is prepared once
    model.prepared.clear()
    model.decode(embeddings[[0, 0]], boxes[0], SHAPE, keys=[keys[0], keys[0]])
    assert model.prepared.stats()["entries"] == 1


def test_the_kept_steps_stay_under_their_budget_least_recently_used_first(lite_onnx, ct_prompts):
    embeddings, _ = ct_prompts
    runtime = lite_onnx.runtime
    one = sum(t.nbytes for t in runtime.prepare(embeddings[:1]))
    assert one == 10 << 20  # LiteMedSAM: 10 MiB a slice
    kept = PreparedSlices(budget_bytes=2 * one)
    keys = [SliceKey("volume", 2, k, "litemedsam", "ct-lung") for k in range(3)]
    for n in (0, 1, 0, 2):  # slice 0 used again before slice 2 comes: slice 1 is the one dropped
        kept.tensors(runtime, keys[n:n + 1], embeddings[n:n + 1])
    stats = kept.stats()
    assert (stats["entries"], stats["bytes"], stats["hits"], stats["misses"]) == (2, 2 * one, 1, 3)
    assert kept.get(keys[1], embeddings[1]) is None
    assert kept.get(keys[0], embeddings[0]) is not None and kept.get(keys[2], embeddings[2]) is not None
    assert PreparedSlices(budget_bytes=one - 1).tensors(runtime, keys[:1], embeddings[:1])[0].shape == (1, 4096, 256)


def test_a_slice_never_gets_another_slices_or_embeddings_tensors(lite_onnx, ct_prompts):
    embeddings, cases = ct_prompts
    runtime = lite_onnx.runtime
    kept = PreparedSlices()
    key = SliceKey("volume", 2, 0, "litemedsam", "ct-lung")
    tensors = kept.tensors(runtime, [key], embeddings[:1])
    # the same key with another embedding (an fp16 copy of it from the embedding cache, another slice): made again
    rounded = embeddings[:1].astype(np.float16).astype(np.float32)
    assert kept.get(key, rounded[0]) is None and kept.get(key, embeddings[1]) is None
    again = kept.tensors(runtime, [key], rounded)
    assert not np.array_equal(again[0], tensors[0])
    coords, labels = cases[0]
    assert np.abs(runtime.decode_prepared(again, coords[:1], labels[:1])
                  - runtime.decode(rounded, coords[:1], labels[:1])).max() < 1e-4
    with pytest.raises(ValueError, match="2 slice keys for 1 embeddings"):
        kept.tensors(runtime, [key, key], embeddings[:1])


def test_two_sessions_on_the_same_volume_keep_their_own_steps(lite_onnx):
    """Through the worker as the server runs it: stacks of two owners (their cache names of the volume differ,
    ``sessions.py``) and two slices of one stack each get tensors of their own, and the masks of plain decoding."""
    volume, labels, direction = ct_volume()
    model = load_model("litemedsam", device="cpu", backend="onnx")
    cache = EmbeddingCache()
    worker = ModelWorker(model, cache)
    worker.start()
    try:
        stacks = [SliceStack(volume, direction, 2, "ct-lung", WorkerModel(worker, owner=owner), cache, digest=owner)
                  for owner in ("owner-a", "owner-b")]
        mask = labels[20] == RIGHT_LUNG
        rows, cols = np.nonzero(mask)
        box = np.array([[cols.min(), rows.min(), cols.max(), rows.max()]], dtype=np.float64)
        for stack in stacks:
            for index in (20, 21):
                embedding, _ = stack.embeddings([index])
                kept = stack.decode(embedding, box, slices=[index])
                assert np.array_equal(kept > 0.5, stack.decode(embedding, box) > 0.5)
        assert model.prepared.stats()["entries"] == 4 and model.prepared.stats()["hits"] == 0
        embedding, _ = stacks[1].embeddings([20])
        again = stacks[1].masks(embedding, box, slices=[20])
        assert model.prepared.stats()["hits"] == 1
        assert dice(again[0], mask) > 0.7  # the right lung (0.80 on this slice)
    finally:
        worker.stop()
