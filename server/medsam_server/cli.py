"""The ``medsam`` command line: one sub-command per job, errors turned into exit code 2 here.

Each sub-command lives in ``commands/`` with a ``register(parser)`` function that adds its
arguments and sets ``func(args) -> int``. Only the module of the command being run is
imported (its own imports are lazy too), so ``medsam --help`` loads neither numpy nor torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from . import __version__
from .errors import Cancelled, InputError

#: Sub-commands in the order ``medsam --help`` lists them: (module, one-line help).
COMMANDS = {
    "annotate": ("medsam_server.commands.annotate", "segment a volume or 2D image from keyframe boxes / RECIST lines"),
    "serve": ("medsam_server.commands.serve", "run the inference server that the Slicer module talks to"),
    "evaluate": ("medsam_server.commands.evaluate", "DSC and NSD of segmentations against references"),
    "simulate": ("medsam_server.commands.simulate",
                 "a simulated annotator: keyframes every K slices from a reference, then DSC/NSD"),
    "study": ("medsam_server.commands.study", "timing-study reports (the paper's Table 15)"),
    "export-onnx": ("medsam_server.commands.export_onnx",
                    "write a model's ONNX graphs (encoder.onnx, decoder.onnx, manifest.json)"),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s arguments are added (the others parse to their help line)."""
    parser = argparse.ArgumentParser(
        prog="medsam", description="MedSAM / LiteMedSAM annotation for CT, MR and 2D images.")
    parser.add_argument("--version", action="version", version=f"medsam {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=summary, description=summary)
        if name == command:
            importlib.import_module(module).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (InputError, FileNotFoundError) as err:
        print(f"medsam {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Cancelled as err:
        print(f"medsam {args.command}: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"medsam {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
