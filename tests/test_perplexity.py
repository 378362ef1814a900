"""Perplexity through the offloaded engine: the figure plain transformers gives for the same windows, the same
bits at any budget, the command's table and JSON line, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import expertflow
from expertflow.cli import main
from expertflow.datasets import XSUM_TEMPLATE, load_prompts, load_texts
from expertflow.embedded import EMBEDDED_MODEL_DIR
from expertflow.errors import ExpertflowError
from expertflow.perplexity import PerplexityConfig, perplexity, score_texts, token_stream, windows
from tests.test_switch import switch_config
from tests.tiny_models import TINY_CONFIGS

CONTEXT = 48


def _stream(length: int = 130, vocab: int = 96) -> list[int]:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(3, vocab, (length,), generator=generator).tolist()


def _reference_nll(model_dir: Path, stream: list[int], context: int) -> float:
    """Mean NLL of stream[1:] by transformers' own model (in the checkpoint's dtype), a forward per disjoint
    window of `context` inputs."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, context):
            inputs = stream[start:start + context]
            targets = torch.tensor(stream[start + 1:start + 1 + len(inputs)])
            inputs = inputs[:len(targets)]
            logp = torch.log_softmax(model(input_ids=torch.tensor([inputs])).logits[0].float(), dim=-1)
            total -= logp.gather(-1, targets[:, None]).double().sum().item()
    return total / (len(stream) - 1)


def test_windows_score_every_token_after_the_first_once() -> None:
    assert windows(10, 4) == [(0, 4), (4, 8), (8, 9)]
    assert windows(9, 4) == [(0, 4), (4, 8)]
    assert windows(2, 1024) == [(0, 1)]
    for length, context in ((10, 4), (9, 4), (130, CONTEXT), (2, 2)):
        scored = [t for a, b in windows(length, context) for t in range(a + 1, b + 1)]
        assert scored == list(range(1, length))
        assert all(b - a <= context for a, b in windows(length, context))


@pytest.mark.parametrize("family", [*sorted(TINY_CONFIGS), "mixtral-bf16"])
def test_perplexity_is_what_transformers_computes_for_the_same_windows(tiny_model_dirs, family, tmp_path) -> None:
    model_dir = tiny_model_dirs[family.removesuffix("-bf16")]
    if family.endswith("-bf16"):  # a bf16 checkpoint runs in bf16, as transformers loads it
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
        model_dir = tmp_path / "bf16"
    stream = _stream()
    result = perplexity(expertflow.from_pretrained(model_dir), stream, context=CONTEXT)
    expected = _reference_nll(model_dir, stream, CONTEXT)
    assert (result.tokens, result.windows, result.context) == (len(stream) - 1, 3, CONTEXT)
    assert result.nll == pytest.approx(expected, rel=1e-6, abs=0)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-6, abs=0)


@pytest.mark.parametrize("policy", ["lru", "lfu", "ring"])
@pytest.mark.parametrize("store", ["disk", "host"])
def test_an_offloaded_run_gives_the_all_resident_figure_exactly(tiny_mixtral_dir, policy, store) -> None:
    stream = _stream()
    resident = perplexity(expertflow.from_pretrained(tiny_mixtral_dir), stream, context=CONTEXT)
    offloaded = perplexity(expertflow.from_pretrained(tiny_mixtral_dir, cache_experts=6, policy=policy, store=store),
                           stream, context=CONTEXT)
    assert offloaded.nll == resident.nll and offloaded.perplexity == resident.perplexity
    assert resident.expert_loads == 0 and offloaded.expert_loads > 0


def test_the_default_window_is_the_models_context(tiny_mixtral_dir) -> None:
    model = expertflow.from_pretrained(tiny_mixtral_dir)
    result = perplexity(model, _stream(300))
    assert (result.context, result.windows) == (256, 2)  # max_position_embeddings of the tiny models


def test_xsum_texts_are_the_documents_without_the_prompt_template(tmp_path: Path) -> None:
    documents, prompts = load_texts("xsum"), load_prompts("xsum")
    assert len(documents) == len(prompts) == 1000
    assert not any(d.startswith("Summarize:") for d in documents)
    assert prompts == [XSUM_TEMPLATE.format(document=document) for document in documents]
    assert load_texts("xsum", limit=2, skip=3) == documents[3:5]
    (tmp_path / "t.jsonl").write_text('{"text": "one"}\n{"prompt": "two"}\n')
    assert load_texts(str(tmp_path / "t.jsonl")) == ["one", "two"]


def test_the_stream_joins_texts_after_eos_and_stops_at_max_tokens_plus_one() -> None:
    model = expertflow.from_pretrained()
    tokenizer = model.tokenizer
    eos = tokenizer.eos_token_id
    first, second = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Hello world.", "A second one."))
    full = token_stream(model, ["Hello world.", "", "A second one."], 1000)
    assert full == [eos, *first, eos, *second]
    assert token_stream(model, ["Hello world.", "A second one."], 3) == full[:4]


def test_the_command_prints_a_table_and_a_json_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["perplexity", "--max-tokens", "256", "--threads", "1", "--json"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "tokens scored" in out and "mean NLL" in out
    line = json.loads(out.strip().splitlines()[-1])
    assert line["tokens"] == 256 and line["windows"] == 1 and line["context"] == 1024
    assert (line["dataset"], line["model"], line["dtype"], line["policy"]) == ("xsum", "tiny-mixtral-32e",
                                                                              "float32", "none")
    assert math.isfinite(line["perplexity"]) and line["perplexity"] > 1 and line["seconds"] > 0
    assert line["perplexity"] == pytest.approx(math.exp(line["nll"]), rel=1e-12)
    # The library on the same text: the command holds no arithmetic of its own.
    library = score_texts(expertflow.from_pretrained(), load_texts("xsum"), PerplexityConfig(max_tokens=256))
    assert library.nll == line["nll"]


def _switch_dir(root: Path) -> Path:
    out = root / "tiny-switch"
    AutoModelForSeq2SeqLM.from_config(switch_config(), dtype=torch.float32).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED_MODEL_DIR / name, out / name)
    return out


@pytest.mark.parametrize("argv, needle", [
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--dataset", "{empty}"], "holds no text to score"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--context", "1"], "--context must be at least 2"),
    (["--context", "4096"], "--context 4096 is above tiny-mixtral-32e's context of 1024 positions"),
    (["--model", "{tokenizerless}"], "has no tokenizer files"),
    (["--model", "{switch}"], "perplexity scores causal LMs; tiny-switch is encoder-decoder"),
])
def test_bad_input_is_one_line(argv, needle, tmp_path: Path, tiny_mixtral_dir, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty.txt").write_text("\n  \n")
    paths = {"{empty}": lambda: tmp_path / "empty.txt", "{tokenizerless}": lambda: tiny_mixtral_dir,
             "{switch}": lambda: _switch_dir(tmp_path)}
    argv = [str(paths[a]()) if a in paths else a for a in argv]
    capsys.readouterr()  # saving the Switch checkpoint prints its progress
    assert main(["perplexity", "--threads", "1", "--max-tokens", "64", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("expertflow: error: ") and needle in lines[0], captured.err
    assert captured.out == ""


def test_too_little_text_is_refused(tiny_mixtral_dir) -> None:
    with pytest.raises(ExpertflowError, match="too little text to score: 1 token"):
        perplexity(expertflow.from_pretrained(tiny_mixtral_dir), [5])
