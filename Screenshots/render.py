"""Render the Extensions Index screenshot headless: the real CT, keyframe boxes, and the segment MedSAM made.

    .venv/bin/python Screenshots/render.py      # writes Screenshots/MedSAMSlicer-1.png (about a minute on a CPU)

CTChest4 from the slicerio wheel; one box per keyframe slice around the expert's right lung (as a user draws
them); LiteMedSAM through ``medsam annotate`` fills the slices in between. Shown as Slicer shows it:
patient right on the left, anterior up (axial), superior up (coronal).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches as patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import slicerio  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUTPUT = os.path.join(HERE, "MedSAMSlicer-1.png")
KEYFRAMES = (12, 19, 26, 31)
SHOWN_SLICE = 22  # between two keyframes: a slice the model filled in
WINDOW = (-1000.0, 400.0)  # lung window as grey levels


def data(name: str) -> str:
    return os.path.join(os.path.dirname(slicerio.__file__), "data", name)


def keyframe_boxes() -> list[dict]:
    segmentation = slicerio.read_segmentation(data("Segmentation.seg.nrrd"))
    labels = np.transpose(segmentation["voxels"], (2, 1, 0))  # (k, j, i)
    value = next(int(s["labelValue"]) for s in segmentation["segments"] if s["name"] == "right lung")
    boxes = []
    for k in KEYFRAMES:
        rows, cols = np.nonzero(labels[k] == value)
        boxes.append({"slice": k, "box": [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]})
    return boxes


def segment(boxes: list[dict], folder: str) -> np.ndarray:
    prompts = os.path.join(folder, "prompts.json")
    with open(prompts, "w") as handle:
        json.dump({"axis": 2, "window": "ct-lung", "segments": [{"name": "right lung", "boxes": boxes}]}, handle)
    output = os.path.join(folder, "right-lung.nrrd")
    subprocess.run([sys.executable, "-m", "medsam_server.cli", "annotate", data("CTChest4.nrrd"), "--prompts", prompts,
                    "--output", output, "--device", "cpu"], check=True, stdout=subprocess.DEVNULL)
    return sitk.GetArrayFromImage(sitk.ReadImage(output)) > 0


def main() -> None:
    image = sitk.ReadImage(data("CTChest4.nrrd"))
    ct = sitk.GetArrayFromImage(image).astype(np.float32)  # (k, j, i); i runs to patient right, j to anterior...
    assert np.allclose(image.GetDirection(), (-1, 0, 0, 0, -1, 0, 0, 0, 1)), "the display flips assume LPS-flipped axes"
    boxes = keyframe_boxes()
    with tempfile.TemporaryDirectory() as folder:
        mask = segment(boxes, folder)
    spacing = image.GetSpacing()
    grey = np.clip((ct - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)

    figure, (axial, coronal) = plt.subplots(1, 2, figsize=(12, 6.2), facecolor="black",
                                            gridspec_kw={"width_ratios": [1, 1]})
    # axial: i and j both run opposite to the screen's right and up (LPS-stored: i to patient left, j to posterior)
    axial.imshow(grey[SHOWN_SLICE, ::-1, ::-1], cmap="gray", interpolation="bilinear")
    overlay = np.zeros(mask.shape[1:] + (4,))
    overlay[mask[SHOWN_SLICE, ::-1, ::-1]] = (0.1, 0.9, 0.3, 0.45)
    axial.imshow(overlay, interpolation="nearest")
    nj, ni = ct.shape[1:]
    below = max(k for k in KEYFRAMES if k <= SHOWN_SLICE)
    u0, v0, u1, v1 = next(b["box"] for b in boxes if b["slice"] == below)
    axial.add_patch(patches.Rectangle((ni - 1 - u1 - 0.5, nj - 1 - v1 - 0.5), u1 - u0 + 1, v1 - v0 + 1, fill=False,
                                      edgecolor=(1.0, 0.82, 0.0), linewidth=2, linestyle="--"))
    axial.set_title(f"axial slice {SHOWN_SLICE}: segment (green), keyframe box of slice {below} (dashed)",
                    color="white", fontsize=10)

    # coronal through the lung's middle row: k runs up (superior), i mirrored as above
    j = int(np.median(np.nonzero(mask)[1]))
    aspect = spacing[2] / spacing[0]
    coronal.imshow(grey[::-1, j, ::-1], cmap="gray", aspect=aspect, interpolation="bilinear")
    overlay = np.zeros((ct.shape[0], ni, 4))
    overlay[mask[::-1, j, ::-1]] = (0.1, 0.9, 0.3, 0.45)
    coronal.imshow(overlay, aspect=aspect, interpolation="nearest")
    nk = ct.shape[0]
    for box in boxes:
        row = nk - 1 - box["slice"]
        u0, _, u1, _ = box["box"]
        coronal.plot([ni - 1 - u1, ni - 1 - u0], [row, row], color=(1.0, 0.82, 0.0), linewidth=2)
    coronal.set_title(f"coronal: {len(boxes)} keyframe boxes (yellow) -> 3D segment", color="white", fontsize=10)
    for axis in (axial, coronal):
        axis.set_axis_off()
    figure.suptitle("MedSAM in 3D Slicer: LiteMedSAM from boxes on four keyframe slices (CTChest, right lung)",
                    color="white", fontsize=12)
    figure.tight_layout()
    figure.savefig(OUTPUT, dpi=100, facecolor="black")
    print(f"wrote {OUTPUT}: {int(mask.sum())} voxels segmented")


if __name__ == "__main__":
    main()
