"""Where a checkpoint came from: `expertflow widen` records the model it padded, so tools can treat a widened
copy as the model it was made from wherever only routing matters (zero padding leaves routing exactly as it
was: the embedded model's copies plan from its shipped routing predictor).

The record is `widened_from.json` in the copy: {"source": absolute path, "source_name", "intermediate_size",
"source_intermediate_size"}.
"""

from __future__ import annotations

import json
from pathlib import Path

from expertflow.errors import ExpertflowError

RECORD_FILE = "widened_from.json"
MAX_CHAIN = 16  # widened copies of widened copies; a longer chain is a cycle of hand-edited records


def write_record(copy_dir: Path, source: Path, intermediate_size: int, source_intermediate_size: int) -> None:
    """Record in `copy_dir` (a staging directory that appears whole) that it is `source` widened."""
    record = {"source": str(Path(source).resolve()), "source_name": Path(source).resolve().name,
              "intermediate_size": intermediate_size, "source_intermediate_size": source_intermediate_size}
    (Path(copy_dir) / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def origin(model: Path) -> Path:
    """The checkpoint `model`'s routing comes from: itself, or the model it was widened from, followed back."""
    current = Path(model).resolve()
    for _ in range(MAX_CHAIN):
        record = current / RECORD_FILE
        if not record.is_file():
            return current
        try:
            current = Path(json.loads(record.read_text())["source"]).resolve()
        except (ValueError, KeyError, TypeError) as err:
            raise ExpertflowError(f"{record} is not a widen record ({err}); delete it or widen the model again") from None
    raise ExpertflowError(f"{Path(model) / RECORD_FILE} leads through more than {MAX_CHAIN} widened copies; "
                          "its records form a cycle: delete them")
