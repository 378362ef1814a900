"""The predictor network (causal, windowed), training on a learnable synthetic trace, save/load, CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from expertflow.cli import main as cli_main
from expertflow.errors import ExpertflowError
from expertflow.predictor.baselines import TemporalBaseline
from expertflow.predictor.evaluate import EvalConfig, evaluate
from expertflow.predictor.model import PredictorConfig, RoutingPathModel, load_model, save_model
from expertflow.predictor.runtime import RoutingPredictor
from expertflow.predictor.train import TrainConfig, split_by_prompt, train_predictor
from expertflow.traces import TraceHeader, TraceSequence, TraceSet

V, L, E, K = 16, 2, 8, 2
SMALL = dict(d_model=32, d_ff=64, num_heads=2, encoder_layers=1, decoder_layers=1, window=4, dropout=0.0)


def synthetic_traces(n: int = 48, length: int = 20, seed: int = 0) -> TraceSet:
    """Random tokens (so the previous token says nothing); layer l routes token x with previous token p to
    experts {x % E, (p + l + 1) % E} (or (x + l + 1) % E on a clash): learnable from a two-token context."""
    rng = np.random.default_rng(seed)
    seqs = []
    for i in range(n):
        ids = rng.integers(0, V, length)
        routing = np.zeros((length, L, K), dtype=np.int16)
        for t in range(length):
            prev = ids[t - 1] if t else 0
            for layer in range(L):
                a, b = ids[t] % E, (prev + layer + 1) % E
                routing[t, layer] = (a, b if b != a else (ids[t] + layer + 1) % E)
        seqs.append(TraceSequence(ids[: length // 2], ids[length // 2 :], routing, prompt_index=i))
    header = TraceHeader(model="synthetic", num_layers=L, num_experts=E, top_k=K, dataset="synthetic",
                         vocab_size=V)
    return TraceSet(header, seqs)


def config(**over) -> PredictorConfig:
    return PredictorConfig(vocab_size=V, num_layers=L, num_experts=E, top_k=K, **{**SMALL, **over})


def test_prediction_for_t_uses_tokens_up_to_t_only() -> None:
    model = RoutingPathModel(config()).eval()
    ids = torch.randint(0, V, (2, 30))
    changed = ids.clone()
    changed[:, 17:] = (changed[:, 17:] + 1) % V
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert a.shape == (2, 30, L, E)
    torch.testing.assert_close(a[:, :17], b[:, :17])
    assert not torch.allclose(a[:, 17], b[:, 17])


def test_predict_next_on_the_tail_equals_the_full_forward() -> None:
    predictor = RoutingPredictor(RoutingPathModel(config()))
    ids = [list(np.random.default_rng(1).integers(0, V, 40)), [3, 4, 5]]
    full = predictor.predict(ids)                                       # (2, 40, L, E)
    nxt = predictor.predict_next(ids)                                   # (2, L, E)
    assert predictor.config.receptive_field < 40
    torch.testing.assert_close(nxt[0], full[0, 39], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt[1], full[1, 2], atol=1e-5, rtol=1e-5)
    assert full[1, 3:].abs().sum() == 0                                  # padding positions are zeros


@pytest.mark.parametrize("head_hidden", [0, 8])
def test_incremental_steps_equal_the_full_forward_for_ragged_batches(head_hidden: int) -> None:
    predictor = RoutingPredictor(RoutingPathModel(config(head_hidden=head_hidden)))
    rng = np.random.default_rng(2)
    seqs = [list(rng.integers(0, V, n)) for n in (14, 8, 9)]
    full = predictor.predict(seqs)                                        # (3, 14, L, E)
    cut = [6, 2, 4]
    state, probs = predictor.start([s[:c] for s, c in zip(seqs, cut)])
    for j in range(3):                                                    # three decoding steps
        expected = torch.stack([full[i, c + j - 1] for i, c in enumerate(cut)])
        torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
        state, probs = predictor.step(state, [s[c + j] for s, c in zip(seqs, cut)])
    # Regrouping: the state of sequences 2 and 0, in that order, steps on unchanged.
    state = state.select([2, 0])
    state, probs = predictor.step(state, [seqs[2][cut[2] + 3], seqs[0][cut[0] + 3]])
    torch.testing.assert_close(probs, torch.stack([full[2, cut[2] + 3], full[0, cut[0] + 3]]), atol=1e-5, rtol=1e-5)


def test_predictors_saved_with_the_old_head_names_load_unchanged(tmp_path: Path) -> None:
    model = RoutingPathModel(config()).eval()
    state = {("heads." + k[len("heads.proj."):] if k.startswith("heads.proj.") else k): v
             for k, v in model.state_dict().items()}
    save_model(model, tmp_path / "rpp")
    save_file(state, str(tmp_path / "rpp" / "model.safetensors"))
    ids = torch.randint(0, V, (1, 12))
    torch.testing.assert_close(load_model(tmp_path / "rpp")(ids), model(ids), rtol=0, atol=0)


def test_config_validation_names_the_problem() -> None:
    with pytest.raises(ValueError, match="divisible"):
        config(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="top_k"):
        PredictorConfig(vocab_size=V, num_layers=L, num_experts=E, top_k=9)
    with pytest.raises(ValueError, match="head_hidden must be >= 0"):
        config(head_hidden=-1)
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=1.0)


def test_split_keeps_runs_of_a_prompt_together() -> None:
    traces = synthetic_traces(n=12)
    for i, s in enumerate(traces.sequences):
        s.prompt_index, s.run = i // 3, i % 3
    train, val = split_by_prompt([traces], 0.25, seed=0)
    assert len(val) == 3 and {s.prompt_index for s in train}.isdisjoint({s.prompt_index for s in val})


def test_trained_predictor_beats_tlp_and_survives_save_load(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    traces = synthetic_traces()
    result = train_predictor([traces], config(), TrainConfig(epochs=25, batch_size=8, lr=1e-2, warmup_steps=10,
                                                             val_fraction=0.1, patience=25), progress=False)
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    held_out = synthetic_traces(n=16, seed=1)
    predictor = RoutingPredictor(result.model)
    scorers = {"rpp": lambda seq, pos: predictor.predict_array(seq.token_ids)[pos],
               "tlp": TemporalBaseline(np.full((L, E), 1 / E)).scores}
    r = evaluate(held_out, scorers, EvalConfig(batch_size=1))
    assert r["rpp"]["b_acc"] > 0.9 and r["rpp"]["b_acc"] > r["tlp"]["b_acc"] + 0.3
    save_model(result.model, tmp_path / "rpp")
    loaded = load_model(tmp_path / "rpp")
    ids = torch.as_tensor(held_out.sequences[0].token_ids[None].astype(np.int64))
    torch.testing.assert_close(loaded(ids), result.model(ids), rtol=0, atol=0)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = cli_main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_and_eval_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = synthetic_traces(n=16).write(tmp_path / "t.safetensors")
    code, out, _ = run_cli(["train-predictor", "--traces", str(path), "--out", str(tmp_path / "rpp"), "--epochs", "2",
                            "--d-model", "16", "--d-ff", "32", "--num-heads", "2", "--encoder-layers", "1",
                            "--decoder-layers", "1", "--window", "4"], capsys)
    assert code == 0 and "parameters" in out
    assert {p.name for p in (tmp_path / "rpp").iterdir()} == {"config.json", "model.safetensors",
                                                               "baselines.safetensors", "training.json"}
    code, out, _ = run_cli(["eval-predictor", "--predictor", str(tmp_path / "rpp"), "--traces", str(path),
                            "--batch-size", "4", "--json"], capsys)
    figures = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and {"rpp", "tlp", "slp", "popularity", "lookup"} <= set(figures)
    for method in figures.values():
        assert {"b_acc", "precision", "recall", "f1", "per_layer"} <= set(method)
        assert len(method["per_layer"]) == L

    # Without its tables (as the shipped predictor comes) the training traces rebuild the same baselines.
    (tmp_path / "rpp" / "baselines.safetensors").unlink()
    code, _, err = run_cli(["eval-predictor", "--predictor", str(tmp_path / "rpp"), "--traces", str(path)], capsys)
    assert code == 2 and "pass --baseline-traces with its training traces" in err
    code, out, _ = run_cli(["eval-predictor", "--predictor", str(tmp_path / "rpp"), "--traces", str(path),
                            "--batch-size", "4", "--baseline-traces", str(path), "--json"], capsys)
    rebuilt = json.loads(out.strip().splitlines()[-1])
    for name in ("popularity", "lookup", "tlp", "slp"):
        assert rebuilt[name]["b_acc"] == figures[name]["b_acc"]


def test_training_goes_on_from_a_trained_predictor(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    traces = synthetic_traces(n=16)
    first = train_predictor([traces], config(), TrainConfig(epochs=3, batch_size=8, lr=1e-2, warmup_steps=1),
                            progress=False).model
    # A vanishing learning rate leaves the start where it was: the weights come from `start`, not a new init.
    resumed = train_predictor([traces], config(), TrainConfig(epochs=1, batch_size=8, lr=1e-12, warmup_steps=1),
                              progress=False, start=first).model
    for name, value in first.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, atol=1e-6, rtol=0)
    save_model(first, tmp_path / "first")
    path = traces.write(tmp_path / "t.safetensors")
    code, _, _ = run_cli(["train-predictor", "--traces", str(path), "--out", str(tmp_path / "again"),
                          "--init-predictor", str(tmp_path / "first"), "--epochs", "1"], capsys)
    assert code == 0 and load_model(tmp_path / "again").config == first.config
    code, _, err = run_cli(["train-predictor", "--traces", str(path), "--out", str(tmp_path / "x"),
                            "--init-predictor", str(tmp_path / "first"), "--d-model", "32"], capsys)
    assert code == 2 and "keeps that predictor's architecture" in err and err.count("\n") == 1
    other = PredictorConfig(vocab_size=V, num_layers=L + 1, num_experts=E, top_k=K, **SMALL)
    save_model(RoutingPathModel(other), tmp_path / "other")
    code, _, err = run_cli(["train-predictor", "--traces", str(path), "--out", str(tmp_path / "x"),
                            "--init-predictor", str(tmp_path / "other")], capsys)
    assert code == 2 and "traces of its own model" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv,match", [
    (["eval-predictor", "--predictor", "{tmp}/none", "--traces", "{tmp}/t.safetensors"], "not a predictor directory"),
    (["train-predictor", "--traces", "{tmp}/broken.safetensors", "--out", "{tmp}/rpp"], "not a readable trace file"),
    (["train-predictor", "--traces", "{tmp}/t.safetensors", "--out", "{tmp}/rpp", "--window", "0"], "window"),
    (["trace", "--dataset", "nonsense", "--out", "{tmp}/x.safetensors"], "unknown dataset"),
    (["trace", "--dataset", "alpaca", "--runs", "3", "--out", "{tmp}/x.safetensors"], "temperature"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                        match: str) -> None:
    synthetic_traces(n=4).write(tmp_path / "t.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    code, _, err = run_cli([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code == 2 and match in err and err.count("\n") == 1


def test_reading_a_wrong_file_raises_expertflow_error(tmp_path: Path) -> None:
    with pytest.raises(ExpertflowError):
        load_model(tmp_path)


def test_listwise_term_adds_the_softmax_cross_entropy_of_the_routed_set() -> None:
    """loss(listwise w) - loss(0) = w x mean over scored (position, layer) of -sum_routed log softmax / K."""
    from expertflow.predictor.train import _loss, _pieces

    torch.manual_seed(0)
    model = RoutingPathModel(PredictorConfig(vocab_size=V, num_layers=L, num_experts=E, top_k=K, **SMALL))
    batch = _pieces(synthetic_traces(3).sequences, 512)
    plain, _, _, bce = _loss(model, batch, E, TrainConfig())
    with_term, _, _, bce_again = _loss(model, batch, E, TrainConfig(listwise_weight=0.5))
    torch.testing.assert_close(bce, bce_again)
    torch.testing.assert_close(plain, bce)
    by_hand = []
    for ids, routing, _ in batch:
        log_p = torch.log_softmax(model(torch.from_numpy(ids.astype(np.int64))[None])[0], -1)   # (S, L, E)
        for t in range(len(ids)):
            for layer in range(L):
                by_hand.append(-sum(log_p[t, layer, int(e)] for e in routing[t, layer]) / K)
    torch.testing.assert_close(with_term - plain, 0.5 * torch.stack(by_hand).mean())
    with pytest.raises(ValueError, match="listwise_weight must be >= 0"):
        TrainConfig(listwise_weight=-1.0)
