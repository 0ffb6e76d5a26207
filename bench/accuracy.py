"""The accuracy ablation of issue 15 (README "Accuracy"): ``medsam simulate --ablation`` on every case.

Cases, each run from keyframe boxes every 3, 5 and 10 slices of the reference (LiteMedSAM):
- ``ct``: slicerio's CTChest4 (a patient chest CT, 128 x 128 x 34 at 3 x 3 x 10 mm) with the expert
  segmentation shipped beside it: both lungs (lung window), thoracic and lumbar spine (bone window).
- ``ct-rotated``: the same CT stored in another voxel order (i and j swapped, both reversed): the
  orientation work must give the same numbers.
- ``mr``: the MNI ICBM152 2009a symmetric T1 template shipped in nilearn's wheel (an average of 152
  healthy adults' MR, not a patient scan), resampled to 2 x 2 x 6 mm as a clinical axial series;
  references from its own tissue maps: brain = grey + white matter probability > 0.5; white matter > 0.5.
  Give the folder with ``--mni`` (``nilearn/datasets/data`` of an installed nilearn, or of its wheel
  unpacked); the case is skipped when it is missing.

Prints each case's table (Dice, NSD at 2 mm, seconds of each stage's whole run) and writes the rows to
``--out``. Usage: python bench/accuracy.py [--cases ct mr] [--every 5] [--mni DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicerio

from medsam_server import cli

SLICERIO_DATA = Path(slicerio.__file__).parent / "data"
# Label values of Segmentation.seg.nrrd: 5, 6 right and left lung; 3, 4 thoracic and lumbar vertebral column.
CT_TARGETS = ((("5", "6"), "ct-lung"), (("3", "4"), "ct-bone"))
MNI_T1 = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
MR_SPACING = (2.0, 2.0, 6.0)


def rotated_ct(folder: Path) -> tuple[Path, Path]:
    """CTChest4 and its expert labelmap with i and j swapped and both reversed (the same physical image)."""
    def turn(image: sitk.Image) -> sitk.Image:
        return sitk.Flip(sitk.PermuteAxes(image, [1, 0, 2]), [True, True, False])

    ct = sitk.ReadImage(str(SLICERIO_DATA / "CTChest4.nrrd"))
    voxels = slicerio.read_segmentation(str(SLICERIO_DATA / "Segmentation.seg.nrrd"))["voxels"]
    labels = sitk.GetImageFromArray(voxels.transpose(2, 1, 0).astype(np.uint8))
    labels.CopyInformation(ct)
    image_path, ref_path = folder / "ct_rotated.nrrd", folder / "ct_rotated_ref.nrrd"
    sitk.WriteImage(turn(ct), str(image_path))
    sitk.WriteImage(turn(labels), str(ref_path))
    return image_path, ref_path


def mr_template(mni: Path, folder: Path) -> tuple[Path, dict[str, Path]]:
    """The T1 template at 2 x 2 x 6 mm and two references (label 1): brain = grey + white matter > 0.5, and
    white matter > 0.5 (they overlap, so each has its own file)."""
    def resampled(kind: str) -> sitk.Image:
        image = sitk.ReadImage(str(mni / MNI_T1.format(kind)))
        size = [round(n * s / t) for n, s, t in zip(image.GetSize(), image.GetSpacing(), MR_SPACING)]
        return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), MR_SPACING,
                             image.GetDirection(), 0.0, sitk.sitkFloat32)

    t1 = resampled("t1")
    grey, white = (sitk.GetArrayFromImage(resampled(kind)) for kind in ("gm", "wm"))
    image_path = folder / "mni_t1.nrrd"
    sitk.WriteImage(t1, str(image_path))
    references = {}
    for name, mask in (("brain", grey + white > 0.5), ("white-matter", white > 0.5)):
        reference = sitk.GetImageFromArray(mask.astype(np.uint8))
        reference.CopyInformation(t1)
        references[name] = folder / f"mni_{name}.nrrd"
        sitk.WriteImage(reference, str(references[name]))
    return image_path, references


def simulate(case: str, image: Path, ref: Path, labels, window: str, every, out: Path) -> None:
    print(f"\n## {case}: {', '.join(labels)} ({window})", flush=True)
    code = cli.main(["simulate", "--image", str(image), "--ref", str(ref), "--labels", *labels, "--window", window,
                     "--every", *map(str, every), "--ablation", "--out", str(out / f"{case}-{window}")])
    if code:
        raise SystemExit(f"medsam simulate failed on {case} ({code})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=("ct", "ct-rotated", "mr"), default=("ct", "ct-rotated", "mr"))
    parser.add_argument("--every", type=int, nargs="+", default=(3, 5, 10))
    parser.add_argument("--mni", type=Path, help="folder of nilearn's MNI ICBM152 2009a files (default: nilearn's)")
    parser.add_argument("--out", type=Path, default=Path("accuracy-report"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if "ct" in args.cases:
            for labels, window in CT_TARGETS:
                simulate("ct", SLICERIO_DATA / "CTChest4.nrrd", SLICERIO_DATA / "Segmentation.seg.nrrd", labels,
                         window, args.every, args.out)
        if "ct-rotated" in args.cases:
            image, ref = rotated_ct(scratch)
            for labels, window in CT_TARGETS:
                simulate("ct-rotated", image, ref, labels, window, args.every, args.out)
        if "mr" in args.cases:
            mni = args.mni or _nilearn_data()
            if mni is None or not (mni / MNI_T1.format("t1")).exists():
                print("\n## mr: skipped (no MNI template: pip install nilearn, or give --mni DIR)")
                return
            image, references = mr_template(mni, scratch)
            for name, ref in references.items():
                simulate(f"mr-{name}", image, ref, ("1",), "mr", args.every, args.out)


def _nilearn_data():
    try:
        import nilearn
    except ImportError:
        return None
    return Path(os.path.dirname(nilearn.__file__)) / "datasets" / "data"


if __name__ == "__main__":
    main()
