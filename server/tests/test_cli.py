"""``medsam annotate`` and ``medsam simulate`` as a user runs them: real files, real model, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from engine_data import LEFT_LUNG, RIGHT_LUNG, dice, slicerio_data
from medsam_server import cli
from medsam_server.io.images import read_image
from medsam_server.io.labels import read_labels

DATA = Path(__file__).parent / "data"

FIRST, LAST = 12, 19  # a slab of the chest CT: 8 slices keep the encoder cost low


@pytest.fixture(scope="module")
def slab(tmp_path_factory):
    """A real slab of CTChest4 on disk, its expert lungs, and a keyframe prompt document for them."""
    folder = tmp_path_factory.mktemp("slab")
    image = sitk.ReadImage(slicerio_data("CTChest4.nrrd"))[:, :, FIRST:LAST + 1]
    sitk.WriteImage(image, str(folder / "ct.nrrd"))
    labels = slicerio.read_segmentation(slicerio_data("Segmentation.seg.nrrd"))["voxels"].transpose(2, 1, 0)
    labels = labels[FIRST:LAST + 1]
    segments = []
    for name, label in (("right lung", RIGHT_LUNG), ("left lung", LEFT_LUNG)):
        boxes = []
        for k in (0, 4, 7):
            rows, cols = np.nonzero(labels[k] == label)
            boxes.append({"slice": k, "box": [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]})
        segments.append({"name": name, "boxes": boxes})
    document = {"axis": 2, "window": "ct-lung", "segments": segments}
    (folder / "prompts.json").write_text(json.dumps(document))
    return folder, labels, document


def annotate_cli(capsys, *args):
    code = cli.main(["annotate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_annotate_writes_a_slicer_segmentation_with_the_input_geometry(slab, capsys):
    folder, labels, _ = slab
    out = folder / "lungs.seg.nrrd"
    code, stdout, _ = annotate_cli(capsys, folder / "ct.nrrd", "--prompts", folder / "prompts.json", "--output", out)
    assert code == 0
    summary = json.loads(stdout)
    assert [s["name"] for s in summary["segments"]] == ["right lung", "left lung"]
    assert all(s["slices"] == 8 for s in summary["segments"])
    assert set(summary["seconds"]) == {"embedding", "decoding"} and "hits" in summary["cache"]
    segmentation = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in segmentation["segments"]] == ["right lung", "left lung"]
    image = sitk.ReadImage(str(folder / "ct.nrrd"))
    assert np.allclose(segmentation["ijkToLPS"][:3, 3], image.GetOrigin())
    written, names = read_labels(out, read_image(folder / "ct.nrrd"))
    assert names == {1: "right lung", 2: "left lung"}
    for position, label in ((1, RIGHT_LUNG), (2, LEFT_LUNG)):
        assert dice(written == position, labels == label) >= 0.8


def test_annotate_writes_a_labelmap_and_refuses_to_overwrite(slab, capsys):
    folder, _, _ = slab
    out = folder / "lungs.nii.gz"
    assert annotate_cli(capsys, folder / "ct.nrrd", "--prompts", folder / "prompts.json", "--output", out)[0] == 0
    written = sitk.ReadImage(str(out))
    image = sitk.ReadImage(str(folder / "ct.nrrd"))
    assert written.GetSize() == image.GetSize()
    assert written.GetSpacing() == pytest.approx(image.GetSpacing())
    assert written.GetDirection() == pytest.approx(image.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(written))) == {0, 1, 2}
    before = out.read_bytes()
    code, _, err = annotate_cli(capsys, folder / "ct.nrrd", "--prompts", folder / "prompts.json", "--output", out)
    assert code == 2 and "exists; pass --force" in err and out.read_bytes() == before


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(extra=1), "unknown key(s) 'extra'"),
    (lambda d: d["segments"][0]["boxes"][0].update(slice=8), "slice 8 is out of range"),
    (lambda d: d["segments"][0]["boxes"][0].update(box=[200, 200, 250, 250]), "lies outside the 128x128 slice"),
    (lambda d: d["segments"][0]["boxes"][0].update(box=[90, 10, 20, 50]), "is reversed"),
    (lambda d: d.update(segments=[]), "non-empty 'segments'"),
    (lambda d: d["segments"][1].update(label=1), "share the label 1"),
])
def test_bad_prompt_documents_exit_2_and_write_nothing(slab, tmp_path, capsys, change, message):
    folder, _, document = slab
    bad = json.loads(json.dumps(document))
    change(bad)
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    out = tmp_path / "out.seg.nrrd"
    code, stdout, err = annotate_cli(capsys, folder / "ct.nrrd", "--prompts", tmp_path / "bad.json", "--output", out)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert stdout == "" and not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "bad.json"]


def test_missing_image_and_bad_json_exit_2(slab, tmp_path, capsys):
    folder, _, _ = slab
    code, _, err = annotate_cli(capsys, tmp_path / "none.nrrd", "--prompts", folder / "prompts.json", "--output",
                                tmp_path / "o.nrrd")
    assert code == 2 and "none.nrrd" in err
    (tmp_path / "p.json").write_text("{oops")
    code, _, err = annotate_cli(capsys, folder / "ct.nrrd", "--prompts", tmp_path / "p.json", "--output",
                                tmp_path / "o.nrrd")
    assert code == 2 and "not valid JSON" in err


def test_the_installed_command_runs_and_reports_progress_on_stderr(slab, tmp_path):
    """The console script as a user types it (a real subprocess): JSON on stdout, progress on stderr."""
    folder, _, document = slab
    small = {**document, "segments": [{**document["segments"][0], "boxes": document["segments"][0]["boxes"][:1]}]}
    (tmp_path / "one.json").write_text(json.dumps(small))
    done = subprocess.run([sys.executable, "-m", "medsam_server.cli", "annotate", str(folder / "ct.nrrd"),
                           "--prompts", str(tmp_path / "one.json"), "--output", str(tmp_path / "one.nrrd")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["segments"][0]["slices"] == 1
    assert "segmenting" in done.stderr


def test_simulate_prints_a_table_and_plots_dice_against_k(slab, tmp_path, capsys):
    folder, labels, _ = slab
    reference = sitk.GetImageFromArray(labels.astype(np.uint8))
    reference.CopyInformation(sitk.ReadImage(str(folder / "ct.nrrd")))
    sitk.WriteImage(reference, str(tmp_path / "ref.nrrd"))
    code = cli.main(["simulate", "--image", str(folder / "ct.nrrd"), "--ref", str(tmp_path / "ref.nrrd"),
                     "--every", "3", "7", "--labels", str(RIGHT_LUNG), "--window", "ct-lung", "--out",
                     str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert code == 0 and "| K | target |" in out
    rows = json.loads((tmp_path / "report" / "simulate.json").read_text())
    assert [(r["every"], r["keyframes"]) for r in rows] == [(3, 4), (7, 2)]
    assert all(r["dsc"] >= 0.8 for r in rows) and rows[1]["cache_hits"] > 0
    assert "| Spearman | error in worst 20 % |" in out  # the review ranking's columns (review.py)
    assert all(r["spearman"] is None or -1 <= r["spearman"] <= 1 for r in rows)
    assert (tmp_path / "report" / "dice_vs_k.png").stat().st_size > 1000


def test_png_in_png_out_for_grayscale_and_rgb(tmp_path, capsys):
    """2D images through `medsam annotate`: a real grayscale PNG and a real RGB PNG, label PNGs out."""
    from PIL import Image
    from scipy import ndimage
    from skimage import data, draw, filters

    coins = data.coins()
    Image.fromarray(coins).save(tmp_path / "coins.png")
    reference = ndimage.binary_fill_holes(coins > filters.threshold_otsu(coins))
    components, _ = ndimage.label(reference)
    coin = components == components[200, 100]  # a coin of the third row (1481 pixels)
    rows, cols = np.nonzero(coin)
    box = [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]
    coin_prompts = {"segments": [{"name": "coin", "boxes": [{"slice": 0, "box": box}]}]}
    (tmp_path / "coin.json").write_text(json.dumps(coin_prompts))
    code, stdout, _ = annotate_cli(capsys, tmp_path / "coins.png", "--prompts", tmp_path / "coin.json", "--output",
                                   tmp_path / "coin-mask.png")
    assert code == 0 and json.loads(stdout)["segments"][0]["slices"] == 1
    mask = np.asarray(Image.open(tmp_path / "coin-mask.png"))
    assert mask.shape == coins.shape and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert dice(mask == 1, coin) >= 0.9

    astronaut = data.astronaut()
    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    polygon = np.array(json.loads((DATA / "rgb_references.json").read_text())["astronaut_patch"]["polygon_xy"])
    patch = np.zeros(astronaut.shape[:2], bool)
    patch[draw.polygon(polygon[:, 1], polygon[:, 0], patch.shape)] = True
    rows, cols = np.nonzero(patch)
    box = [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]
    (tmp_path / "patch.json").write_text(json.dumps({"segments": [{"name": "patch", "label": 7,
                                                                   "boxes": [{"slice": 0, "box": box}]}]}))
    code, _, _ = annotate_cli(capsys, tmp_path / "astronaut.png", "--prompts", tmp_path / "patch.json", "--output",
                              tmp_path / "patch-mask.png")
    assert code == 0
    mask = np.asarray(Image.open(tmp_path / "patch-mask.png"))
    assert mask.shape == patch.shape and dice(mask == 7, patch) >= 0.9
