"""Presenting results: rich tables for people, one final JSON line for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in ("figure", "value", "system", "policy") else "right")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    Console(file=sys.stdout, width=120).print(table)


def print_json_line(payload: dict) -> None:
    """The last stdout line of a --json run: one JSON object."""
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def print_note(note: str | None) -> None:
    """A one-line note on stderr (stdout stays the run's output and its JSON line)."""
    if note:
        print(f"expertflow: note: {note}", file=sys.stderr)
