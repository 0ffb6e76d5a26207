"""What ``medsam annotate`` reads and writes besides the image: output names, --existing, the segments to write.

DICOM in, DICOM SEG out: IMAGE a DICOM series folder and OUT ending in ``.dcm`` writes a DICOM
Segmentation of that series (``io.dicomseg``); ``--existing`` may be a DICOM SEG of the series.
Every name that cannot work is refused here, before the model loads.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Optional

from ..errors import InputError

if TYPE_CHECKING:  # numpy and the readers load when a command runs, not when the parser is built
    import numpy as np


def check_paths(args: argparse.Namespace) -> tuple[bool, bool]:
    """Refuse an output name or a DICOM SEG that cannot work, before anything is read or loaded.

    Returns (the output is a DICOM SEG, --existing is a DICOM SEG).
    """
    from ..io.dicomseg import SEG_SUFFIX, is_dicom_seg
    from ..io.images import suffix
    from ..io.labels import OUTPUT_SUFFIXES

    series_folder = args.image.is_dir()
    seg_output = suffix(args.output) == SEG_SUFFIX
    if seg_output and args.output.exists() and not args.force:
        raise InputError(f"{args.output} exists; pass --force to replace it")
    if seg_output and not series_folder:
        raise InputError(f"a DICOM SEG output ({args.output.name}) is made on a DICOM series: give the series' "
                         f"folder as IMAGE, or write {', '.join(OUTPUT_SUFFIXES)}")
    if not seg_output and suffix(args.output) not in OUTPUT_SUFFIXES:
        raise InputError(f"cannot write labels to {args.output.name}: the output must end in "
                         f"{', '.join((*OUTPUT_SUFFIXES, SEG_SUFFIX))}")
    seg_existing = args.existing is not None and (suffix(args.existing) == SEG_SUFFIX or is_dicom_seg(args.existing))
    if seg_existing and not series_folder:
        raise InputError(f"a DICOM SEG given as --existing ({args.existing.name}) belongs to a DICOM series: give "
                         "that series' folder as IMAGE")
    return seg_output, seg_existing


def read_existing(args: argparse.Namespace, volume, seg_existing: bool) -> tuple[Optional[np.ndarray], dict[int, str]]:
    """--existing as (k, j, i) labels on the image's grid and {label: name}; (None, {}) without it."""
    if args.existing is None:
        return None, {}
    if seg_existing:
        from ..io.dicomseg import read_seg

        return read_seg(args.existing, volume.dicom)
    from ..io.labels import read_labels

    return read_labels(args.existing, volume)


def segments_to_write(prompts, existing_names: dict[int, str], volume, seg_output: bool) -> tuple[list, dict]:
    """(name, label, colour) of every segment to write, and the user's DICOM codes by segment name.

    The existing file's segments that no prompt redoes are written back under their own names.
    For a DICOM SEG the series must allow one and every name needs a code: both fail now, not after the run.
    """
    from ..io.labels import segment_colour

    segments = [(s.name, s.label, segment_colour(n)) for n, s in enumerate(prompts.segments)]
    prompted = {s.label for s in prompts.segments}
    for label, name in sorted(existing_names.items()):
        if label not in prompted:
            segments.append((name, label, segment_colour(len(segments))))
    codes = {s.name: s.code for s in prompts.segments if s.code is not None}
    if seg_output:
        from ..io.dicomseg import check_seg_source, segment_code

        check_seg_source(volume.dicom)
        for name, _, _ in segments:
            segment_code(name, codes.get(name))
    return segments, codes


def write_seg_output(args: argparse.Namespace, labels: np.ndarray, volume, segments: list, codes: dict) -> None:
    """Write the run's (k, j, i) labels to --output as a DICOM SEG of the series the image was read from."""
    from ..io.dicomseg import write_seg

    write_seg(args.output, labels, volume.dicom, segments, model=args.model, codes=codes, replace=args.force)
