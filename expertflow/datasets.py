"""Prompt sets by name or path: the paper's evaluation sets (alpaca, xsum, wmt16, aime24), the language-model
corpus the embedded model was trained on (`corpus`, for predictor training data), and local files.

Named sets ship inside the package (`expertflow/data`, gzipped; licences in its README); `$EXPERTFLOW_DATA`
points at another data root laid out the same way (plain or gzipped files). Local files:
`.jsonl` (field `prompt`, else `text`, one object per line), `.txt` (one prompt per line), `.json` (a list
of strings, of objects with `prompt`/`text`, or of Alpaca records with `instruction`).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path

from expertflow.errors import ExpertflowError

DATA_ENV_VAR = "EXPERTFLOW_DATA"

# The paper's templates: a chat-style instruction for alpaca, "Summarize:" for xsum, "Translate to Finnish:" for wmt16.
ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
XSUM_TEMPLATE = "Summarize: {document}\nSummary:"
WMT16_TEMPLATE = "Translate to Finnish: {text}\nFinnish:"
AIME_TEMPLATE = "Solve the problem.\n{problem}\nAnswer:"
CORPUS_MIN_CHARS = 200  # a corpus line this long is a paragraph of prose or code, not a heading or a blank


PACKAGE_DATA = Path(__file__).resolve().parent / "data"


def data_root() -> Path:
    env = os.environ.get(DATA_ENV_VAR)
    return Path(env).expanduser() if env else PACKAGE_DATA


def alpaca_prompt(record: dict) -> str:
    if record.get("input"):
        return ALPACA_INPUT_TEMPLATE.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_TEMPLATE.format(instruction=record["instruction"])


def alpaca_records(root: Path | None = None) -> list[dict]:
    """The Alpaca records themselves (instruction, input, output), e.g. for a task built on their outputs."""
    return _read_json((root or data_root()) / "eval" / "alpaca_en_demo.json")


def _load_alpaca(root: Path) -> list[str]:
    return [alpaca_prompt(r) for r in alpaca_records(root)]


def _load_xsum(root: Path) -> list[str]:
    return [XSUM_TEMPLATE.format(document=r["document"]) for r in _read_jsonl(root / "eval" / "xsum_test.jsonl")]


def _load_wmt16(root: Path) -> list[str]:
    lines = _read_lines(root / "eval" / "wmt16_newstest2016_enfi.en")
    return [WMT16_TEMPLATE.format(text=line) for line in lines]


def _load_aime24(root: Path) -> list[str]:
    return [AIME_TEMPLATE.format(problem=r["problem"]) for r in _read_jsonl(root / "eval" / "aime24.jsonl")]


def _load_corpus(root: Path) -> list[str]:
    """Paragraphs of every corpus file, interleaved file by file, so any slice mixes the domains (arxiv,
    books, c4, code, wikipedia, WikiText) rather than being one of them."""
    files = sorted([*(root / "corpus").glob("*.txt"), *(root / "corpus").glob("*.txt.gz")])
    if not files:
        _check_exists(root / "corpus" / "*.txt")
    per_file = [[line for line in _read_lines(f) if len(line) >= CORPUS_MIN_CHARS] for f in files]
    longest = max(map(len, per_file))
    return [paragraphs[i] for i in range(longest) for paragraphs in per_file if i < len(paragraphs)]


NAMED_DATASETS: dict[str, Callable[[Path], list[str]]] = {
    "alpaca": _load_alpaca,
    "xsum": _load_xsum,
    "wmt16": _load_wmt16,
    "aime24": _load_aime24,
    "corpus": _load_corpus,
}
LOCAL_SUFFIXES = (".jsonl", ".txt", ".json")


def load_prompts(name_or_path: str, limit: int | None = None, skip: int = 0) -> list[str]:
    """Prompts of a named set or a local file, in file order; `skip` then `limit` select a slice."""
    if (limit is not None and limit < 0) or skip < 0:
        raise ValueError(f"limit and skip must be >= 0, got limit={limit} skip={skip}")
    if name_or_path in NAMED_DATASETS:
        prompts = NAMED_DATASETS[name_or_path](data_root())
    else:
        prompts = _load_local(Path(name_or_path))
    end = None if limit is None else skip + limit
    return prompts[skip:end]


# Each named set's own text, without a prompt template: what `load_texts` gives a perplexity run to score.
NAMED_TEXTS: dict[str, Callable[[Path], list[str]]] = {
    "alpaca": lambda root: ["\n\n".join(filter(None, (r["instruction"], r["input"], r["output"])))
                            for r in alpaca_records(root)],
    "xsum": lambda root: [r["document"] for r in _read_jsonl(root / "eval" / "xsum_test.jsonl")],
    "wmt16": lambda root: _read_lines(root / "eval" / "wmt16_newstest2016_enfi.en"),
    "aime24": lambda root: [r["problem"] for r in _read_jsonl(root / "eval" / "aime24.jsonl")],
    "corpus": _load_corpus,
}


def load_texts(name_or_path: str, limit: int | None = None, skip: int = 0) -> list[str]:
    """Raw text to score, in file order: a named set's own text (xsum's documents, wmt16's English sentences,
    aime24's problems, alpaca's instruction, input and output, the corpus paragraphs), or a local file read as
    `load_prompts` reads it; `skip` then `limit` select a slice."""
    if name_or_path not in NAMED_TEXTS:
        return load_prompts(name_or_path, limit, skip)  # a local file's rows are its text
    if (limit is not None and limit < 0) or skip < 0:
        raise ValueError(f"limit and skip must be >= 0, got limit={limit} skip={skip}")
    end = None if limit is None else skip + limit
    return NAMED_TEXTS[name_or_path](data_root())[skip:end]


def _load_local(path: Path) -> list[str]:
    if path.suffix not in LOCAL_SUFFIXES:
        raise ExpertflowError(
            f"unknown dataset {str(path)!r}: use one of {', '.join(NAMED_DATASETS)} "
            f"or a path to a {'/'.join(LOCAL_SUFFIXES)} file")
    if path.suffix == ".txt":
        return _read_lines(path)
    rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_json(path)
    if not isinstance(rows, list):
        raise ExpertflowError(f"{path}: expected a JSON list of prompts, got {type(rows).__name__}")
    return [_utf8(_row_prompt(row, path, i), path, i) for i, row in enumerate(rows)]


def _utf8(prompt: str, path: Path, index: int) -> str:
    """A JSON string may escape a lone surrogate ("\\ud800"): valid JSON, but no text a tokenizer takes."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ExpertflowError(f"{path}: row {index} must be UTF-8 text, but character {exc.start} is a lone "
                              "surrogate escape (\\ud800-\\udfff); write the prompt as UTF-8") from None
    return prompt


def _row_prompt(row: object, path: Path, index: int) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        for key in ("prompt", "text"):
            if isinstance(row.get(key), str):
                return row[key]
        if isinstance(row.get("instruction"), str):
            return alpaca_prompt(row)
    raise ExpertflowError(f"{path}: row {index} has no string field 'prompt', 'text' or 'instruction'")


def _check_exists(path: Path) -> None:
    if not path.is_file():
        hint = f" (set {DATA_ENV_VAR} to the data directory)" if path.is_relative_to(data_root()) else ""
        raise ExpertflowError(f"dataset file not found: {path}{hint}")


def _read_text(path: Path) -> str:
    """A file's text; a named set's file may be stored gzipped beside its plain name (`x.json` as `x.json.gz`)."""
    gzipped = path.with_name(path.name + ".gz")
    if not path.is_file() and gzipped.is_file():
        path = gzipped
    _check_exists(path)
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ExpertflowError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded); "
                              "save it as UTF-8") from None


def _read_lines(path: Path) -> list[str]:
    return [line.rstrip("\n") for line in _read_text(path).splitlines() if line.strip()]


def _read_jsonl(path: Path) -> list:
    rows = []
    for number, line in enumerate(_read_lines(path), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ExpertflowError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
    return rows


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ExpertflowError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
