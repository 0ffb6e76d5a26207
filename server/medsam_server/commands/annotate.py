"""``medsam annotate IMAGE --prompts PROMPTS.json --output OUT``: the sparse-marker workflow on a file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..annotate import AnnotateOptions, annotate
from ..errors import InputError
from ..models import BACKENDS, DEFAULT_MODEL, DEVICES, MODEL_NAMES, load_model
from ..preprocess import DEFAULT_ORIENTATION, ORIENTATIONS, WINDOW_NAMES
from ..prompts import parse_prompts
from ..volumes import read_image, read_labels, segment_colour, write_labels


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "annotate", help="segment a volume or 2D image from keyframe boxes / RECIST lines",
        description="Segment IMAGE from a prompt document (DESIGN.md section 4). OUT ending in .seg.nrrd is a Slicer "
                    "segmentation; .png a 2D label image; any other extension a labelmap.",
    )
    p.add_argument("image", type=Path, help="NRRD, NIfTI, MHA, a DICOM series folder, or PNG/JPEG/TIFF/BMP")
    p.add_argument("--prompts", type=Path, required=True, help="the prompt document (JSON)")
    p.add_argument("--output", "-o", type=Path, required=True, help="OUT: .seg.nrrd, .nrrd, .nii.gz, .mha or .png")
    add_model_arguments(p)
    p.add_argument("--window", help=f"overrides the document's window: {', '.join(WINDOW_NAMES)} or LOW,HIGH")
    p.add_argument("--propagate", type=int, default=0, metavar="N",
                   help="grow each segment up to N slices past its outermost keyframes (default 0)")
    p.add_argument("--existing", type=Path, help="a segmentation whose labels are kept (locked slices read it)")
    p.add_argument("--overwrite", action="store_true", help="let later segments take voxels of earlier ones")
    p.add_argument("--no-fill-holes", action="store_true", help="keep holes inside each slice's mask")
    p.add_argument("--all-components", action="store_true", help="keep every 3D component, not only the largest")
    p.add_argument("--interpolation", choices=("pchip", "linear"), default="pchip", help="box interpolation")
    p.add_argument("--orientation", choices=ORIENTATIONS, default=DEFAULT_ORIENTATION,
                   help="in-plane orientation in which slices reach the model (default %(default)s)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model options every command that runs a model shares."""
    p.add_argument("--model", choices=MODEL_NAMES, default=DEFAULT_MODEL)
    p.add_argument("--checkpoint", type=Path, help="weights file (default: bundled / downloaded once)")
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--device", choices=DEVICES, default="auto")


def parse_window_argument(text: str):
    if "," in text:
        try:
            return [float(v) for v in text.split(",")]
        except ValueError:
            raise InputError(f"--window LOW,HIGH needs two numbers, got {text!r}") from None
    return text


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    output: Path = args.output
    if output.exists() and not args.force:
        raise InputError(f"{output} exists; pass --force to replace it")
    try:
        document = json.loads(args.prompts.read_text())
    except FileNotFoundError:
        raise InputError(f"prompt document {args.prompts} does not exist") from None
    except json.JSONDecodeError as err:
        raise InputError(f"prompt document {args.prompts} is not valid JSON: {err}") from None
    if args.window is not None and isinstance(document, dict):
        document["window"] = parse_window_argument(args.window)
    volume = read_image(args.image)
    prompts = parse_prompts(document, volume.size)
    existing = None
    if args.existing is not None:
        existing, _ = read_labels(args.existing, volume)
    options = AnnotateOptions(
        propagate=args.propagate, fill_holes=not args.no_fill_holes, largest_component=not args.all_components,
        overwrite=args.overwrite, interpolation=args.interpolation, orientation=args.orientation,
    )
    model = load_model(args.model, args.checkpoint, args.device, args.backend)
    with tqdm(total=1, desc="segmenting", unit="slice", file=sys.stderr) as bar:
        def progress(phase: str, done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        result = annotate(volume.array, volume.direction, prompts, model, options=options, existing=existing,
                          progress=progress)
    segments = [(s.name, s.label, segment_colour(n)) for n, s in enumerate(prompts.segments)]
    write_labels(output, result.labels, volume, segments, input_path=args.image)
    summary = {"output": str(output), "model": args.model, "backend": args.backend, "device": model.device,
               **result.summary()}
    summary["notes"] = volume.notes + summary["notes"]
    print(json.dumps(summary, indent=2))
    return 0
