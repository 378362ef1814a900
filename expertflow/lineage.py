"""Where a checkpoint came from: `expertflow widen` records the model it padded, so tools can treat a widened
copy as the model it was made from wherever only routing matters (zero padding leaves routing exactly as it
was: the embedded model's copies plan from its shipped routing predictor).

The record is `widened_from.json` in the copy: {"source": absolute path, "source_name", "intermediate_size",
"source_intermediate_size", "origin_sha256"}. The path is followed first; the fingerprint of the chain's first
model (`fingerprint`) still names it after that model has moved (a reinstalled package, a CI clone).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from expertflow.errors import ExpertflowError

RECORD_FILE = "widened_from.json"
MAX_CHAIN = 16  # widened copies of widened copies; a longer chain is a cycle of hand-edited records


def fingerprint(model: Path) -> str:
    """sha256 of a checkpoint's safetensors files, in name order (~0.2 s for the embedded model's 106 MB)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model).glob("*.safetensors")):
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def write_record(copy_dir: Path, source: Path, intermediate_size: int, source_intermediate_size: int) -> None:
    """Record in `copy_dir` (a staging directory that appears whole) that it is `source` widened."""
    source = Path(source).resolve()
    upstream = _record(source)
    record = {"source": str(source), "source_name": source.name, "intermediate_size": intermediate_size,
              "source_intermediate_size": source_intermediate_size,
              "origin_sha256": upstream["origin_sha256"] if upstream and "origin_sha256" in upstream
              else fingerprint(source)}
    (Path(copy_dir) / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def origin(model: Path) -> Path:
    """The checkpoint `model`'s routing comes from: itself, or the model it was widened from, followed back."""
    current = Path(model).resolve()
    for _ in range(MAX_CHAIN):
        record = _record(current)
        if record is None:
            return current
        current = Path(record["source"]).resolve()
    raise ExpertflowError(f"{Path(model) / RECORD_FILE} leads through more than {MAX_CHAIN} widened copies; "
                          "its records form a cycle: delete them")


def routes_as(model: Path, reference: Path) -> bool:
    """Whether `model` is `reference` or a widened copy of it, by the recorded path or, where that has moved,
    by the fingerprint of the chain's first model."""
    if origin(model) == Path(reference).resolve():
        return True
    record = _record(Path(model).resolve())
    return record is not None and record.get("origin_sha256") == fingerprint(reference)


def _record(model: Path) -> dict | None:
    path = model / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        Path(record["source"])
    except (ValueError, KeyError, TypeError) as err:
        raise ExpertflowError(f"{path} is not a widen record ({err}); delete it or widen the model again") from None
    return record
