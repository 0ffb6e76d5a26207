"""The ``medsam`` command line: one sub-command per job, errors turned into exit code 2 here.

Each sub-command lives beside the code it drives and registers itself through a
``register(subparsers)`` function that adds its parser and sets ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from . import __version__
from .errors import Cancelled, InputError

# Modules that contribute sub-commands, in the order `medsam --help` lists them.
COMMAND_MODULES = (
    "medsam_server.commands.annotate",
    "medsam_server.commands.serve",
    "medsam_server.commands.evaluate",
    "medsam_server.commands.simulate",
    "medsam_server.commands.study",
    "medsam_server.commands.export_onnx",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsam", description="MedSAM / LiteMedSAM annotation for CT, MR and 2D images.")
    parser.add_argument("--version", action="version", version=f"medsam {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
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
