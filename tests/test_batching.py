"""Many prompts, batched and regrouped between steps: each sequence's tokens are those it gets alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import expertflow
from expertflow.cli import main
from expertflow.cache.policies import POLICIES

PROMPTS = [[5, 17, 33, 8, 41, 60, 12], [70, 3, 9], [11, 12, 13, 14, 15], [40, 41, 42, 43, 44, 45, 46, 47, 48],
           [88, 7], [21, 22, 23, 24, 25, 26], [61, 62, 63, 64]]
NEW_TOKENS = 10


class RandomPredictor:
    """A deliberately uninformed RPP: random probabilities; outputs must stay exact, only loads may suffer."""

    def __init__(self, layers: int, experts: int) -> None:
        self.generator = torch.Generator().manual_seed(1)
        self.shape = (layers, experts)

    def predict(self, token_ids):
        return torch.rand(len(token_ids), max(map(len, token_ids)), *self.shape, generator=self.generator)

    def predict_next(self, token_ids):
        return torch.rand(len(token_ids), *self.shape, generator=self.generator)

    def start_rows(self, token_ids):
        return [None] * len(token_ids), self.predict_next(token_ids)

    def step_rows(self, states, tokens):
        return states, torch.rand(len(tokens), *self.shape, generator=self.generator)


def _alone(model, prompts):
    return [model.generate(input_ids=[p], max_new_tokens=NEW_TOKENS).sequences[0] for p in prompts]


@pytest.mark.parametrize("scheduler", ["fifo", "similarity", "swap"])
@pytest.mark.parametrize("batch_size,unit", [(2, 2), (3, 2), (2, 3)])
@pytest.mark.parametrize("pipeline", [True, False])
def test_regrouped_sequences_decode_as_alone(tiny_mixtral_dir, scheduler, batch_size, unit, pipeline):
    m = expertflow.from_pretrained(tiny_mixtral_dir, cache_experts=8)
    out = m.generate_many(input_ids=PROMPTS, batch_size=batch_size, schedule_unit=unit, scheduler=scheduler,
                          max_new_tokens=NEW_TOKENS, pipeline=pipeline)
    assert out.sequences == _alone(expertflow.from_pretrained(tiny_mixtral_dir), PROMPTS)
    assert out.stats.new_tokens == sum(map(len, out.sequences))


@pytest.mark.parametrize("policy", sorted(p for p in POLICIES if p not in ("all-resident", "belady")))
def test_every_live_policy_with_a_predicted_schedule(tiny_mixtral_dir, policy):
    m = expertflow.from_pretrained(tiny_mixtral_dir, cache_experts=8, policy=policy,
                                   predictor=RandomPredictor(3, 8))
    out = m.generate_many(input_ids=PROMPTS, batch_size=2, scheduler="similarity", max_new_tokens=NEW_TOKENS)
    assert out.sequences == _alone(expertflow.from_pretrained(tiny_mixtral_dir), PROMPTS)


def test_a_failing_predictor_surfaces_in_the_caller(tiny_mixtral_dir):
    class Broken(RandomPredictor):
        def step_rows(self, states, tokens):
            raise RuntimeError("predictor exploded")

    m = expertflow.from_pretrained(tiny_mixtral_dir, predictor=Broken(3, 8))
    with pytest.raises(RuntimeError, match="predictor exploded"):
        m.generate_many(input_ids=PROMPTS, batch_size=2, scheduler="similarity", max_new_tokens=4)
    assert not m.engine.recorder.enabled


def test_activated_experts_per_batch_counts_distinct_pairs(tiny_mixtral_dir):
    """fifo with one batch: per decode step, the union of the live sequences' recorded routing."""
    m = expertflow.from_pretrained(tiny_mixtral_dir)
    prompts = PROMPTS[:3]
    ref = m.generate(input_ids=prompts, max_new_tokens=NEW_TOKENS, record_routing=True)
    expected, fed = [], []
    for step in range(max(map(len, ref.sequences)) - 1):  # a sequence's last token is never fed
        rows = [r[len(p) + step] for r, p, g in zip(ref.routing, prompts, ref.sequences) if step < len(g) - 1]
        expected.append(len({(layer, int(e)) for r in rows for layer, es in enumerate(r) for e in es}))
        fed.append(len(rows))
    out = m.generate_many(input_ids=prompts, batch_size=3, max_new_tokens=NEW_TOKENS, pipeline=False)
    assert out.sequences == ref.sequences
    assert out.decode_forwards == len(expected)
    assert out.activated_experts_per_batch == pytest.approx(np.mean(expected))
    assert out.activated_experts_per_token == pytest.approx(sum(expected) / sum(fed))


def test_forecast_accuracy_scores_each_decode_batch_as_it_ran(tiny_mixtral_dir):
    """fifo, one batch of three: per decode step, the live sequences' forecasts (the predictor's
    probabilities for the token being fed) against the routing that token took, B_acc as eval-predictor
    scores it. An oracle scores 1.0; a wrong predictor scores what the hand count says."""
    from expertflow.predictor.metrics import MetricAccumulator, routing_mask
    from tests.test_policy_exactness import HashPredictor, OraclePredictor

    prompts = PROMPTS[:3]
    ref = expertflow.from_pretrained(tiny_mixtral_dir).generate(input_ids=prompts, max_new_tokens=NEW_TOKENS,
                                                                record_routing=True)
    expected = MetricAccumulator(3, 2, budget=None)
    wrong = HashPredictor(3, 8)
    for step in range(max(map(len, ref.sequences)) - 1):
        live = [i for i, g in enumerate(ref.sequences) if step < len(g) - 1]
        truth = np.stack([ref.routing[i][len(prompts[i]) + step] for i in live])
        scores = np.stack([wrong.per_token(list(prompts[i]) + ref.sequences[i][: step + 1])[-1] for i in live])
        expected.add(routing_mask(truth, 8), scores)
    for predictor, want in ((OraclePredictor(3, 8, prompts, ref), None), (wrong, expected.result())):
        m = expertflow.from_pretrained(tiny_mixtral_dir, cache_experts=12, policy="expertflow", predictor=predictor)
        out = m.generate_many(input_ids=prompts, batch_size=3, max_new_tokens=NEW_TOKENS, pipeline=False)
        m.close()
        assert out.sequences == ref.sequences
        got = out.forecast_accuracy
        assert got["batches"] == out.decode_forwards == expected.batches
        if want is None:
            assert got["b_acc"] == got["precision"] == 1.0
        else:
            assert 0 < got["b_acc"] < 1 and got.keys() == want.keys()
            for key, value in want.items():  # approx compares flat values only (pytest 9 refuses nesting)
                assert got[key] == pytest.approx(value), key
    plain = expertflow.from_pretrained(tiny_mixtral_dir, cache_experts=12).generate_many(
        input_ids=prompts, batch_size=3, max_new_tokens=NEW_TOKENS)
    assert plain.forecast_accuracy is None  # no predictor, no forecasts to score


def test_a_batch_the_scheduler_keeps_keeps_its_kv_and_the_rest_are_moved(tiny_mixtral_dir):
    """A regrouping that keeps batch 0 and swaps rows between batches 1 and 2: batch 0 is the same object
    (its KV untouched), the others are rebuilt, and every sequence still decodes as it would alone."""
    from collections import deque

    from expertflow.engine.steps import BatchRunner, Sequence
    from expertflow.engine.sampling import Sampler
    from expertflow.scheduler import Grouping, Scheduler

    class KeepFirst(Scheduler):
        name = "keep-first"

        def _group(self, routing, batch_size, unit):
            return Grouping(((0, 1), (2, 4), (3, 5)))

    m = expertflow.from_pretrained(tiny_mixtral_dir, cache_experts=8)
    prompts = PROMPTS[:6]
    runner = BatchRunner(m.engine, KeepFirst(), batch_size=2, unit=3, pipeline=False)
    with runner.session():
        waiting = deque(Sequence(i, list(p), NEW_TOKENS, Sampler(0.0, None)) for i, p in enumerate(prompts))
        batches = runner.sample(runner.admit(waiting, 0), [])
        regrouped = runner.regroup(batches)
    assert regrouped[0] is batches[0]
    assert [[s.index for s in b.members] for b in regrouped] == [[0, 1], [2, 4], [3, 5]]
    assert all(b.kv.rows == 2 for b in regrouped[1:]) and regrouped[1] is not batches[1]
    out = m.generate_many(input_ids=prompts, batch_size=2, schedule_unit=3, max_new_tokens=NEW_TOKENS, pipeline=False)
    kept = BatchRunner(m.engine, KeepFirst(), batch_size=2, unit=3, pipeline=False).run(prompts, NEW_TOKENS)
    assert kept.sequences == out.sequences == _alone(m, prompts)


def test_embedded_model_xsum_prompts_similarity_equals_alone():
    from expertflow.datasets import load_prompts

    m = expertflow.from_pretrained(cache_experts=64)
    prompts = [m.encode(p)[-96:] for p in load_prompts("xsum", limit=6)]
    out = m.generate_many(input_ids=prompts, batch_size=3, scheduler="similarity", max_new_tokens=8)
    assert out.sequences == [m.generate(input_ids=[p], max_new_tokens=8).sequences[0] for p in prompts]


def test_generate_prompts_file_json(capsys, tmp_path):
    lines = ["The capital of France is", "Describe a process of making crepes.", "Water boils at"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in lines))
    capsys.readouterr()
    rc = main(["generate", "--prompts-file", str(path), "--batch-size", "2", "--scheduler", "similarity",
               "--max-new-tokens", "5", "--cache-experts", "32", "--json"])
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0
    m = expertflow.from_pretrained()
    assert payload["outputs"] == [m.generate(p, max_new_tokens=5).sequences[0] for p in lines]
    for field in ("activated_experts_per_batch", "hit_ratio", "expert_loads", "tokens_per_s"):
        assert payload[field] > 0


def test_prompts_file_errors(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    capsys.readouterr()
    assert main(["generate", "--prompts-file", str(empty)]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    assert main(["generate", "--prompts-file", str(tmp_path / "none.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.txt" in err


def test_encoder_decoder_models_are_refused_for_batched_scheduling(capsys, tmp_path):
    from tests.test_switch import switch_config  # the tiny Switch the Switch tests build
    from transformers import AutoModelForSeq2SeqLM

    AutoModelForSeq2SeqLM.from_config(switch_config()).save_pretrained(tmp_path / "switch")
    m = expertflow.from_pretrained(tmp_path / "switch")
    with pytest.raises(expertflow.ExpertflowError, match="decoder-only models"):
        m.generate_many(input_ids=[[5, 6, 7]], batch_size=2)


def test_session_streams_tokens_honours_per_request_limits_and_cancellation(tiny_mixtral_dir):
    from expertflow.engine.steps import BatchRunner, Sequence
    from expertflow.engine.sampling import Sampler
    from expertflow.scheduler import scheduler_class

    m = expertflow.from_pretrained(tiny_mixtral_dir, cache_experts=8)
    runner = BatchRunner(m.engine, scheduler_class("similarity")(), batch_size=2, unit=2)
    streamed: dict[int, list[int]] = {}

    def on_token(seq, token):
        streamed.setdefault(seq.index, []).append(token)
        if seq.index == 1 and len(seq.generated) == 3:
            seq.cancelled = True  # as a client disconnecting would

    limits = [10, 10, 4, 7, 10]
    with runner.session() as session:
        for i, (p, limit) in enumerate(zip(PROMPTS, limits)):
            session.add(Sequence(i, p, limit, Sampler(0.0, None), on_token=on_token))
        while session.busy:
            session.step()
    done = {s.index: s for s in session.finished}
    assert sorted(done) == list(range(5))
    assert done[1].finish_reason == "cancelled" and done[1].generated == streamed[1] and len(streamed[1]) == 3
    reference = expertflow.from_pretrained(tiny_mixtral_dir)
    for i in (0, 2, 3, 4):
        alone = reference.generate(input_ids=[PROMPTS[i]], max_new_tokens=limits[i]).sequences[0]
        assert done[i].generated == streamed[i] == alone
        assert done[i].finish_reason == ("stop" if alone[-1] == 2 else "length")


def test_session_abort_returns_everything_in_flight(tiny_mixtral_dir):
    from expertflow.engine.steps import BatchRunner, Sequence
    from expertflow.engine.sampling import Sampler
    from expertflow.scheduler import scheduler_class

    m = expertflow.from_pretrained(tiny_mixtral_dir)
    runner = BatchRunner(m.engine, scheduler_class("fifo")(), batch_size=2, unit=1)
    with runner.session() as session:
        for i, p in enumerate(PROMPTS):
            session.add(Sequence(i, p, 50, Sampler(0.0, None)))
        session.step()
        dropped = session.abort()
        assert not session.busy
        assert sorted(s.index for s in dropped) + sorted(s.index for s in session.finished) == list(range(7))
        session.add(Sequence(9, PROMPTS[0], 3, Sampler(0.0, None)))
        while session.busy:
            session.step()
    assert session.finished[-1].index == 9 and len(session.finished[-1].generated) <= 3


def test_per_sequence_rpp_states_regroup_without_changing_forecasts():
    """start_rows/step_rows with states regrouped in another order give predict_next's probabilities."""
    from expertflow.predictor.model import PredictorConfig, RoutingPathModel
    from expertflow.predictor.runtime import RoutingPredictor

    torch.manual_seed(0)
    rpp = RoutingPredictor(RoutingPathModel(PredictorConfig(vocab_size=96, num_layers=3, num_experts=8, top_k=2,
                                                            d_model=16, d_ff=32, num_heads=2, window=8,
                                                            dropout=0.0)))
    seqs = [list(p) for p in PROMPTS[:4]]
    states, _ = rpp.start_rows(seqs)
    for step in range(3):
        order = [3, 1, 0, 2] if step % 2 == 0 else [2, 0, 3, 1]
        tokens = [(7 * i + step) % 96 for i in range(4)]
        for i in range(4):
            seqs[i].append(tokens[i])
        new, probs = rpp.step_rows([states[i] for i in order], [tokens[i] for i in order])
        for row, i in enumerate(order):
            states[i] = new[row]
        torch.testing.assert_close(probs, rpp.predict_next([seqs[i] for i in order]), atol=1e-5, rtol=0)
