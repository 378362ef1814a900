"""`expertflow widen`: zero-pad every expert to a larger intermediate size (outputs unchanged)."""

from __future__ import annotations

import argparse
from pathlib import Path

from expertflow.embedded import EMBEDDED_MODEL_DIR
from expertflow.widen import widen_checkpoint


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("widen", help="copy a checkpoint with zero-padded, larger experts")
    parser.add_argument("--model", type=Path, default=EMBEDDED_MODEL_DIR)
    parser.add_argument("--intermediate-size", type=int, required=True, metavar="N")
    parser.add_argument("--out", type=Path, required=True)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = widen_checkpoint(args.model, args.out, args.intermediate_size)
    print(f"wrote {out} (experts widened to intermediate size {args.intermediate_size})")
    return 0
