"""``make demo``: the main job on the embedded default, end to end.

The real chest CT shipped in slicerio's wheel (CTChest4, 128x128x34, 3x3x10 mm) gets
keyframe boxes every 5 slices made from its expert lung segments (a simulated
annotator), ``medsam annotate`` segments both lungs with LiteMedSAM, and the Dice of
each segment against the expert's is printed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from . import cli
from .io.images import read_image
from .io.labels import read_labels
from .metrics import case_scores
from .simulate import simulated_prompts, target_labels

EVERY = 5
TARGETS = ("right lung", "left lung")


def sample_data() -> tuple[Path, Path]:
    """CTChest4 and its expert segmentation inside the installed slicerio package (never downloaded)."""
    import slicerio

    folder = Path(os.path.dirname(slicerio.__file__)) / "data"
    return folder / "CTChest4.nrrd", folder / "Segmentation.seg.nrrd"


def main(out_dir: str = "out") -> int:
    image_path, reference_path = sample_data()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    volume = read_image(image_path)
    reference, names = read_labels(reference_path, volume)
    targets = target_labels(names, TARGETS)
    prompts_path = out / "CTChest4-lungs.prompts.json"
    prompts_path.write_text(json.dumps(simulated_prompts(reference, targets, EVERY, window="ct-lung"), indent=1))
    output = out / "CTChest4-lungs.seg.nrrd"
    print(f"Segmenting both lungs of {image_path.name} from keyframe boxes every {EVERY} slices ({prompts_path})",
          file=sys.stderr)
    code = cli.main(["annotate", str(image_path), "--prompts", str(prompts_path), "--output", str(output), "--force"])
    if code:
        return code
    result, _ = read_labels(output, volume)
    print(f"\nWrote {output}. Dice against the expert segmentation:")
    for label, (name, ref_label) in enumerate(targets, start=1):
        scores = case_scores(reference == ref_label, result == label, volume.spacing)
        print(f"  {name:<12} DSC {scores['dsc']:.3f}   NSD (2 mm) {scores['nsd']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
