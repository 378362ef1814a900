"""`expertflow widen`: zero-pad every expert to a larger intermediate size (outputs unchanged)."""

from __future__ import annotations

import argparse
from pathlib import Path

from expertflow.cli.options import add_model_option, model_or_embedded
from expertflow.widen import widen_checkpoint


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("widen", help="copy a checkpoint with zero-padded, larger experts")
    add_model_option(parser)
    parser.add_argument("--intermediate-size", type=int, required=True, metavar="N")
    parser.add_argument("--out", type=Path, required=True, help="directory to write (new or empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing --out: replace the copy's files, keep any others")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = widen_checkpoint(model_or_embedded(args.model), args.out, args.intermediate_size, overwrite=args.overwrite)
    print(f"wrote {out} (experts widened to intermediate size {args.intermediate_size})")
    return 0
