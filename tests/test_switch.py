"""Switch Transformers (encoder-decoder, top-1, expert capacity) through the real loading path, against
transformers' own `generate`: tokens identical, last logits allclose, at every cache size, store and live policy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForSeq2SeqLM

import expertflow
from expertflow.cache.direct_io import SLOT_SLACK
from expertflow.adapters import SwitchAdapter, adapter_for
from expertflow.cli import main
from expertflow.embedded import EMBEDDED_MODEL_DIR
from expertflow.errors import ExpertflowError
from expertflow.cache.policies import POLICIES
from expertflow.cache.policies.forecast import one_hot_routing
from expertflow.simulator import batch_forwards
from expertflow.traces import NO_EXPERT, read_traces, summarize

# The last prompt is longer than 8 experts x capacity 2: every encoder layer drops some of its tokens.
PROMPTS = [[5, 17, 33, 8, 41, 60, 12], [70, 3, 9], list(range(100, 121))]
NEW_TOKENS = 8
LAYERS, EXPERTS = 4, 8


def switch_config(**overrides):
    spec = dict(vocab_size=8192, d_model=32, d_kv=8, d_ff=16, num_heads=4, num_layers=2, num_decoder_layers=2,
                num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=EXPERTS, expert_capacity=2,
                pad_token_id=1, eos_token_id=0, decoder_start_token_id=1, tie_word_embeddings=False)
    return AutoConfig.for_model("switch_transformers", **{**spec, **overrides})


@pytest.fixture(scope="module")
def switch_dir(tmp_path_factory) -> Path:
    """A tiny random Switch (2+2 sparse layers, 8 experts) saved like a hub checkpoint, with the embedded
    model's BPE-8192 tokenizer so text goes in and out."""
    out = tmp_path_factory.mktemp("switch") / "tiny-switch"
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(switch_config(), dtype=torch.float32)
    with torch.no_grad():  # decisive routing: random init is near-uniform
        for name, param in model.named_parameters():
            if name.endswith("router.classifier.weight"):
                param.mul_(20.0)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED_MODEL_DIR / name, out / name)
    return out


def reference_generate(model_dir: Path, prompts: list[list[int]], max_new_tokens: int):
    """transformers' greedy `generate` on right-padded prompts: ids per prompt (cut after eos), last logits."""
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), model.config.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
        mask[b, : len(p)] = 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    eos = model.generation_config.eos_token_id
    sequences = []
    for row in out.sequences[:, 1:].tolist():  # drop the decoder start token
        sequences.append(row[: next((i + 1 for i, t in enumerate(row) if t == eos), len(row))])
    return sequences, out.logits[-1].float()


@pytest.fixture(scope="module")
def reference(switch_dir):
    return reference_generate(switch_dir, PROMPTS, NEW_TOKENS)


def _run(switch_dir, **kwargs):
    m = expertflow.from_pretrained(switch_dir, **kwargs)
    try:
        return m.generate(input_ids=PROMPTS, max_new_tokens=NEW_TOKENS, record_routing=True)
    finally:
        m.close()


def _assert_matches(out, reference) -> None:
    sequences, logits = reference
    assert out.sequences == sequences
    if all(len(s) == NEW_TOKENS for s in sequences):  # an early eos leaves the last logits of another step
        torch.testing.assert_close(out.last_logits, logits, atol=1e-5, rtol=0)


def test_adapter_numbers_sparse_blocks_encoder_then_decoder():
    config = switch_config(num_layers=4, num_sparse_encoder_layers=2, num_decoder_layers=6,
                           num_sparse_decoder_layers=3)
    config.architectures = ["SwitchTransformersForConditionalGeneration"]
    adapter = adapter_for(config)
    assert isinstance(adapter, SwitchAdapter) and adapter.top_k == 1
    with init_empty_weights():
        skeleton = AutoModelForSeq2SeqLM.from_config(config)
    assert adapter.moe_layers(skeleton) == [0, 1, 2, 3, 4]
    assert adapter.experts_path(1) == "encoder.block.3.layer.1.mlp.experts"
    assert adapter.experts_path(2) == "decoder.block.1.layer.2.mlp.experts"
    assert [(s.name, s.blocks, s.moe_blocks, s.moe_layers) for s in adapter.stacks(skeleton)] == [
        ("encoder", 4, (1, 3), (0, 1)), ("decoder", 6, (1, 3, 5), (2, 3, 4))]
    assert adapter.is_expert_tensor("decoder.block.5.layer.2.mlp.experts.expert_7.wo.weight")
    assert not adapter.is_expert_tensor("decoder.block.5.layer.2.mlp.router.classifier.weight")


def test_dropped_token_maps_to_no_expert():
    adapter = SwitchAdapter(switch_config())
    mask = torch.zeros(3, 1, EXPERTS, dtype=torch.long)
    mask[0, 0, 5] = 1
    mask[2, 0, 0] = 1  # token 1 was over capacity: all-zero row
    index, weights = adapter.routing_inputs(mask, torch.tensor([[0.9], [0.8], [0.7]]))
    assert index.tolist() == [[5], [EXPERTS], [0]] and weights.shape == (3, 1)


@pytest.mark.parametrize("store", ["host", "disk"])
@pytest.mark.parametrize("cache", [LAYERS, LAYERS * EXPERTS // 2, LAYERS * EXPERTS])
def test_lru_matches_transformers(switch_dir, reference, store, cache):
    out = _run(switch_dir, cache_experts=cache, policy="lru", store=store)
    _assert_matches(out, reference)
    assert out.stats.peak_expert_bytes <= cache * (out.stats.expert_bytes + SLOT_SLACK)  # a disk slot's spare page


LIVE_POLICIES = sorted(name for name, cls in POLICIES.items() if not cls.needs_future and not cls.uses_forecast)


@pytest.mark.parametrize("policy", LIVE_POLICIES)
def test_every_live_policy_matches_transformers(switch_dir, reference, policy):
    smallest = POLICIES[policy].min_capacity(list(range(LAYERS)), EXPERTS, 1)
    for cache in sorted({smallest, max(smallest, 12)}):
        out = _run(switch_dir, cache_experts=cache, policy=policy, store="disk")
        _assert_matches(out, reference)
        assert out.stats.expert_loads == out.stats.prefetch_loads + out.stats.correction_loads


def test_forecasting_policy_without_a_predictor_is_refused_in_one_line(switch_dir):
    forecasting = [name for name, cls in POLICIES.items() if cls.uses_forecast and not cls.needs_future]
    for policy in forecasting:
        with pytest.raises(ExpertflowError, match="predictor") as err:
            expertflow.from_pretrained(switch_dir, cache_experts=8, policy=policy)
        assert "\n" not in str(err.value)


def test_routing_covers_both_stacks_and_capacity_drops(switch_dir, reference):
    out = _run(switch_dir, cache_experts=8)
    _assert_matches(out, reference)
    for prompt, generated, routing in zip(PROMPTS, out.sequences, out.routing):
        assert routing.shape == (len(prompt) + len(generated), LAYERS, 1)
        encoder, decoder = routing[: len(prompt)], routing[len(prompt):]
        assert (encoder[:, 2:] == -1).all() and (decoder[:, :2] == -1).all()  # each stack its own layers
        assert (decoder[:, 2:] >= 0).all()  # one token per decoder step never exceeds capacity
    long_prompt = out.routing[2][: len(PROMPTS[2])]
    dropped = (long_prompt[:, :2] == -1).sum(axis=0)
    assert (dropped >= len(PROMPTS[2]) - 2 * EXPERTS).all()  # at most capacity 2 per expert per layer
    # Tokens past every expert's capacity got no expert and were still computed exactly (tokens matched).


def test_generate_cli_text_to_text(switch_dir, capsys):
    prompt = "Translate to Finnish: the house is small."
    rc = main(["generate", "--model", str(switch_dir), "--prompt", prompt, "--max-new-tokens", "6",
               "--cache-experts", "6", "--store", "disk", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = expertflow.from_pretrained(switch_dir)
    ids = m.encode(prompt)
    assert result["token_ids"] == reference_generate(switch_dir, [ids], 6)[0][0]
    assert result["text"] == m.decode(result["token_ids"])
    assert result["peak_expert_bytes"] <= 6 * (result["expert_bytes"] + SLOT_SLACK)


def test_inspect_reports_encoder_and_decoder_moe_layers(switch_dir, capsys):
    rc = main(["inspect", "--model", str(switch_dir), "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and "encoder 2 blocks, MoE blocks 0-1 = layers 0-1" in out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["architecture"] == "SwitchTransformersForConditionalGeneration"
    assert report["moe_layers"] == [0, 1, 2, 3] and report["layers"] == 4 and report["dense_layers"] == []
    assert [s["name"] for s in report["stacks"]] == ["encoder", "decoder"]
    assert report["experts_per_layer"] == EXPERTS and report["top_k"] == 1
    assert report["expert_bytes"] == 2 * 16 * 32 * 4 and report["all_expert_bytes"] == 32 * report["expert_bytes"]
    assert report["checkpoint_layout"] == "per-expert"
    assert report["min_cache_experts"]["lru"] == LAYERS


def test_trace_and_simulate_both_stacks(switch_dir, tmp_path, capsys):
    """Traces hold encoder routing on prompt rows and decoder routing on generated rows, NO_EXPERT elsewhere;
    the simulator replays a prompt forward over encoder layers only and a decode forward over decoder layers."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Translate to Finnish: the house is small.\nTranslate to Finnish: good morning.\n")
    trace_file = tmp_path / "switch.safetensors"
    assert main(["trace", "--model", str(switch_dir), "--dataset", str(prompts), "--max-new-tokens", "5",
                 "--out", str(trace_file)]) == 0
    traces = read_traces(trace_file)
    assert (traces.header.num_layers, traces.header.num_experts, traces.header.top_k) == (LAYERS, EXPERTS, 1)
    for seq in traces.sequences:
        prompt = len(seq.prompt_ids)
        assert (seq.routing[:prompt, 2:] == NO_EXPERT).all() and (seq.routing[prompt:, :2] == NO_EXPERT).all()
        assert (seq.routing[prompt:, 2:] >= 0).all()
    assert all(0 <= share <= 1 for share in summarize(traces).prev_token_overlap)
    forwards = batch_forwards(traces, batch_size=2)
    assert all(fw.experts[2:] == ((), ()) and fw.experts[0] for fw in forwards if fw.prefill)
    assert all(fw.experts[:2] == ((), ()) and fw.experts[2] for fw in forwards if not fw.prefill)
    oracle = one_hot_routing(traces.sequences[0].routing, EXPERTS)
    assert oracle[0, 2:].sum() == 0 and (oracle[0, :2].sum(-1) <= 1).all()

    capsys.readouterr()
    assert main(["simulate", "--traces", str(trace_file), "--model", str(switch_dir), "--policies", "lru,ring",
                 "--cache-experts", "4,16", "--transfer-ratio", "1", "--json"]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert len(results) == 4 and all(0 <= r["hit_ratio"] <= 1 for r in results)
