"""Trace collection through the engine: the recorded routing is the routing the model executes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import expertflow
from expertflow.cli import main as cli_main
from expertflow.traces import read_traces
from expertflow.trace_collection import TracingConfig, collect_traces, encode_prompts

PROMPTS = [[5, 17, 33, 40, 8], [60, 3], [11, 12, 13, 14, 15, 16, 70]]


@pytest.fixture(scope="module")
def engine_model(tiny_mixtral_dir: Path):
    return expertflow.from_pretrained(tiny_mixtral_dir)


def reference_routing(model_dir: Path, ids: list[int], top_k: int) -> np.ndarray:
    """(T, L, K) sorted expert ids from transformers' own full-sequence forward with router logits."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_router_logits=True)
    logits = torch.stack([r.view(len(ids), -1) for r in out.router_logits], dim=1)    # (T, L, E)
    return logits.topk(top_k, dim=-1).indices.sort(-1).values.numpy()


def test_recorded_routing_equals_the_models_routing(engine_model, tiny_mixtral_dir: Path) -> None:
    traces = collect_traces(engine_model, PROMPTS, TracingConfig(dataset="ids", max_new_tokens=6, batch_size=2))
    h = traces.header
    assert (h.num_layers, h.num_experts, h.top_k, h.vocab_size) == (3, 8, 2, 96)
    assert [list(s.prompt_ids) for s in traces.sequences] == PROMPTS
    for seq in traces.sequences:
        assert seq.routing.shape == (seq.num_tokens, 3, 2) and 1 <= len(seq.generated_ids) <= 6
        expected = reference_routing(tiny_mixtral_dir, seq.token_ids.tolist(), 2)
        np.testing.assert_array_equal(np.sort(seq.routing, -1), expected)


def test_sampled_runs_differ_but_share_the_prompt_routing(engine_model, tmp_path: Path) -> None:
    config = TracingConfig(dataset="ids", runs=2, temperature=1.5, seed=7, max_new_tokens=8)
    traces = collect_traces(engine_model, PROMPTS[:1], config)
    first, second = traces.sequences
    assert (first.run, second.run) == (0, 1) and first.prompt_index == second.prompt_index == 0
    n = len(PROMPTS[0])
    np.testing.assert_array_equal(first.routing[:n], second.routing[:n])
    assert first.generated_ids.tolist() != second.generated_ids.tolist()
    again = collect_traces(engine_model, PROMPTS[:1], config)
    assert [s.generated_ids.tolist() for s in again.sequences] == [s.generated_ids.tolist() for s in traces.sequences]


def test_long_prompts_keep_head_and_tail() -> None:
    class Tok:
        def __call__(self, text: str) -> dict:
            return {"input_ids": [int(w) for w in text.split()]}

    ids = encode_prompts(Tok(), [" ".join(map(str, range(100))), "1 2"], max_tokens=40)
    assert ids[0] == list(range(24)) + list(range(84, 100)) and ids[1] == [1, 2]


def test_trace_cli_on_the_embedded_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "alpaca.safetensors"
    code = cli_main(["trace", "--dataset", "alpaca", "--samples", "3", "--skip", "5", "--max-new-tokens", "4",
                     "--out", str(out)])
    assert code == 0
    traces = read_traces(out)
    assert len(traces.sequences) == 3 and traces.header.dataset == "alpaca"
    assert [s.prompt_index for s in traces.sequences] == [5, 6, 7]
    assert cli_main(["trace-info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 sequences" in printed and "entropy" in printed
