"""``medsam annotate IMAGE --prompts PROMPTS.json --output OUT``: the sparse-marker workflow on a file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ..errors import InputError
from ..intensity import WINDOW_NAMES, window_from_text
from ..models import add_model_arguments
from ..requests import add_option_arguments, options_from_arguments
from .annotate_io import check_paths, read_existing, segments_to_write, write_seg_output


def register(p: argparse.ArgumentParser) -> None:
    p.description = ("Segment IMAGE from a prompt document (README, 'The command line'). OUT ending in .seg.nrrd is a "
                     "Slicer segmentation; .png a 2D label image; any other extension a labelmap.")
    p.add_argument("image", type=Path, help="NRRD, NIfTI, MHA, a DICOM series folder, or PNG/JPEG/TIFF/BMP")
    p.add_argument("--prompts", type=Path, required=True, help="the prompt document (JSON)")
    p.add_argument("--output", "-o", type=Path, required=True,
                   help="OUT: .seg.nrrd, .nrrd, .nii.gz, .mha, .png, or .dcm (a DICOM SEG; IMAGE a DICOM series)")
    p.add_argument("--series", metavar="UID", help="the SeriesInstanceUID to read when IMAGE is a folder of "
                   "several DICOM series")
    add_model_arguments(p)
    p.add_argument("--window", help=f"overrides the document's window: {', '.join(WINDOW_NAMES)} or LOW,HIGH")
    p.add_argument("--existing", type=Path, help="a segmentation whose labels are kept (locked slices read it): "
                   "a labelmap, a .seg.nrrd, or a DICOM SEG of the IMAGE series")
    add_option_arguments(p)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--report", type=Path, metavar="JSON", help="write each slice's confidence here, least "
                   "confident first: the slices to review")
    p.set_defaults(func=run)


def progress_bar(bar):
    """An ``annotate`` progress callback that moves a tqdm bar."""
    def progress(phase: str, done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    return progress


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..io.images import read_image
    from ..io.labels import check_output, write_labels
    from ..models import load_model
    from ..multiview import annotate_multiview
    from ..prompts import parse_prompts

    output: Path = args.output
    seg_output, seg_existing = check_paths(args)
    if not seg_output:
        check_output(output, args.image, replace=args.force)  # before minutes of work, not after
    try:
        document = json.loads(args.prompts.read_text())
    except FileNotFoundError:
        raise InputError(f"prompt document {args.prompts} does not exist") from None
    except json.JSONDecodeError as err:
        raise InputError(f"prompt document {args.prompts} is not valid JSON: {err}") from None
    check_report_path(args.report, args.force)
    if args.window is not None and isinstance(document, dict):
        document["window"] = window_from_text(args.window)
    options = options_from_arguments(args)
    volume = read_image(args.image, series_uid=args.series)
    prompts = parse_prompts(document, volume.size)
    existing, existing_names = read_existing(args, volume, seg_existing)
    segments, codes = segments_to_write(prompts, existing_names, volume, seg_output)
    model = load_model(args.model, args.checkpoint, args.device, args.backend, precision=args.precision,
                       threads=args.threads)
    with tqdm(total=1, desc="segmenting", unit="slice", file=sys.stderr) as bar:
        result = annotate_multiview(volume.array, volume.direction, volume.spacing, prompts, model, options=options,
                                    existing=existing, progress=progress_bar(bar))
    if seg_output:
        write_seg_output(args, result.labels, volume, segments, codes)
    else:
        write_labels(output, result.labels, volume, segments, input_path=args.image, replace=args.force)
    summary = {"output": str(output), "model": args.model, "backend": model.backend,
               "precision": model.precision, "device": model.device,
               **result.summary()}
    summary["notes"] = volume.notes + summary["notes"]
    print(json.dumps(summary, indent=2))
    if args.report is not None:
        args.report.write_text(json.dumps(result.review(prompts.axis), indent=1) + "\n")
    return 0


def check_report_path(report: Optional[Path], replace: bool) -> None:
    """A ``--report`` path that can be written, checked before the model loads."""
    if report is None:
        return
    if report.exists() and not replace:
        raise InputError(f"{report} exists; pass --force to replace it")
    if not report.parent.is_dir():
        raise InputError(f"the folder of --report {report} does not exist")
