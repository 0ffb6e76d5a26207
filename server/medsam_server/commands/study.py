"""``medsam study summarize STUDY_DIR [--out DIR]``: a timing-study folder -> Table 15 (CSV, Markdown, PNG)."""

from __future__ import annotations

import argparse
import os
import sys


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = "Timing-study reports from the JSON-lines records of the Slicer module."
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    summarize = actions.add_parser(
        "summarize", help="per case and annotator: manual vs assisted time, as CSV, Markdown and a PNG",
        description="Read every *.jsonl under STUDY_DIR and write table15.csv, table15.md and table15.png. "
                    "The Markdown table also goes to stdout; warnings (skipped lines, unfinished sessions) to stderr.")
    summarize.add_argument("study_dir", metavar="STUDY_DIR", help="the study folder the recorder writes into")
    summarize.add_argument("--out", metavar="DIR", help="output folder (default: STUDY_DIR/summary)")
    summarize.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..study import summarize, to_markdown

    def warn(message: str) -> None:
        print(f"medsam study: warning: {message}", file=sys.stderr)

    out_dir = args.out or os.path.join(args.study_dir, "summary")
    table, paths = summarize(args.study_dir, out_dir, warn=warn)
    sys.stdout.write(to_markdown(table))
    print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    return 0
