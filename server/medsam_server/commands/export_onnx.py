"""``medsam export-onnx``: write a model's encoder and decoder graphs as ONNX files.

``--backend onnx`` exports into the user cache by itself; this command is for
people who want the graphs elsewhere (another runtime, another machine).
"""

from __future__ import annotations

import argparse
import json

from ..models import MODEL_NAMES


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Export the image encoder and the prompt+mask decoder of a model to ONNX (opset 17, "
                          "dynamic batch and prompt count). Prints the written paths as JSON on stdout.")
    parser.add_argument("--model", choices=MODEL_NAMES, required=True, help="which model to export")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write into (created if missing)")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="weights file (default: the model's bundled or downloaded weights)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models.onnx_export import export_onnx

    paths = export_onnx(args.model, args.out, checkpoint=args.checkpoint)
    print(json.dumps({"model": args.model, "files": [str(p) for p in paths]}))
    return 0
