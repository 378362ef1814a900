"""Prompt sets by name (the real files shipped in expertflow/data) and by local path."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import expertflow
from expertflow.datasets import DATA_ENV_VAR, NAMED_DATASETS, PACKAGE_DATA, alpaca_records, data_root, load_prompts
from expertflow.errors import ExpertflowError


@pytest.mark.parametrize("name,count,start", [("alpaca", 999, "### Instruction:\n"), ("xsum", 1000, "Summarize: "),
                                              ("wmt16", 3000, "Translate to Finnish: "),
                                              ("aime24", 30, "Solve the problem.")])
def test_named_sets_load_with_their_templates(name: str, count: int, start: str) -> None:
    prompts = load_prompts(name)
    assert len(prompts) == count
    assert all(p.startswith(start) for p in prompts)


def test_named_sets_ship_inside_the_package_and_load_with_no_data_folder_anywhere(tmp_path: Path) -> None:
    """A user has no sibling data folder: the named sets come from the installed package alone."""
    assert PACKAGE_DATA.is_relative_to(Path(expertflow.__file__).parent)
    env = {k: v for k, v in os.environ.items() if k != DATA_ENV_VAR}
    code = ("from expertflow.datasets import NAMED_DATASETS, data_root, load_prompts; "
            "print(data_root()); print(*(len(load_prompts(n)) for n in sorted(NAMED_DATASETS)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert Path(out[0]) == PACKAGE_DATA
    counts = dict(zip(sorted(NAMED_DATASETS), map(int, out[1].split())))
    assert {k: v for k, v in counts.items() if k != "corpus"} == {"aime24": 30, "alpaca": 999, "wmt16": 3000,
                                                                  "xsum": 1000}
    assert counts["corpus"] > 10_000
    licences = (PACKAGE_DATA / "README.md").read_text()
    for source in ("CC BY-NC 4.0", "CC BY-SA", "Apache-2.0", "XSum", "WMT16", "AIME"):
        assert source in licences


def test_a_data_root_may_hold_plain_or_gzipped_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "eval").mkdir()
    (tmp_path / "corpus").mkdir()
    (tmp_path / "eval" / "aime24.jsonl.gz").write_bytes(gzip.compress(b'{"problem": "1+1?"}\n'))
    (tmp_path / "corpus" / "a.txt").write_text("a" * 200 + "\n")
    (tmp_path / "corpus" / "b.txt.gz").write_bytes(gzip.compress(("b" * 200 + "\nshort\n").encode()))
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    assert load_prompts("aime24") == ["Solve the problem.\n1+1?\nAnswer:"]
    assert load_prompts("corpus") == ["a" * 200, "b" * 200]


def test_alpaca_input_goes_into_the_template_and_slicing_works() -> None:
    records = alpaca_records()
    with_input = next(i for i, r in enumerate(records) if r["input"])
    prompt = load_prompts("alpaca", limit=1, skip=with_input)[0]
    assert records[with_input]["input"] in prompt and "### Input:" in prompt
    assert prompt.endswith("### Response:\n")
    assert load_prompts("alpaca", limit=3, skip=10) == load_prompts("alpaca")[10:13]


def test_local_files(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"prompt": "one"}\n{"text": "two"}\n\n')
    (tmp_path / "b.txt").write_text("first\n\nsecond\n")
    (tmp_path / "c.json").write_text(json.dumps(["x", {"prompt": "y"}, {"instruction": "z", "input": ""}]))
    assert load_prompts(str(tmp_path / "a.jsonl")) == ["one", "two"]
    assert load_prompts(str(tmp_path / "b.txt")) == ["first", "second"]
    assert load_prompts(str(tmp_path / "c.json"))[:2] == ["x", "y"]


def test_data_root_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "aime24.jsonl").write_text('{"problem": "2+2?"}\n')
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    assert load_prompts("aime24") == ["Solve the problem.\n2+2?\nAnswer:"]
    with pytest.raises(ExpertflowError, match=DATA_ENV_VAR):
        load_prompts("xsum")


@pytest.mark.parametrize("name,match", [("nonsense", "alpaca, xsum, wmt16, aime24"),
                                        ("missing.jsonl", "not found"), ("bad.jsonl", "invalid JSON"),
                                        ("nofield.jsonl", "no string field")])
def test_errors_are_one_line(tmp_path: Path, name: str, match: str) -> None:
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "nofield.jsonl").write_text('{"q": 1}\n')
    target = name if name == "nonsense" else str(tmp_path / name)
    with pytest.raises(ExpertflowError, match=match) as info:
        load_prompts(target)
    assert "\n" not in str(info.value)
    assert set(NAMED_DATASETS) == {"alpaca", "xsum", "wmt16", "aime24", "corpus"}


def test_corpus_paragraphs_interleave_the_files() -> None:
    files = sorted((data_root() / "corpus").glob("*.txt.gz"))
    assert len(files) == 7
    firsts = [next(line for line in gzip.decompress(f.read_bytes()).decode().splitlines() if len(line) >= 200)
              for f in files]
    prompts = load_prompts("corpus", limit=len(files))
    assert prompts == [line.rstrip("\n") for line in firsts]
    assert all(len(p) >= 200 for p in load_prompts("corpus", limit=200, skip=1000))
