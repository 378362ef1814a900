"""Router distillation: the teacher's logits are the traced model's routing; the loss is BCE + weighted KL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSeq2SeqLM

import expertflow
from expertflow.cli import main as cli_main
from expertflow.errors import ExpertflowError
from expertflow.predictor.distill import RouterTeacher
from expertflow.predictor.model import PredictorConfig, RoutingPathModel
from expertflow.predictor.train import TrainConfig, _loss, train_predictor
from expertflow.traces import write_traces
from expertflow.trace_collection import TracingConfig, collect_traces
from tests.test_switch import switch_config
from tests.tiny_models import TINY_CONFIGS

PROMPTS = [[5, 17, 33, 40, 8], [60, 3], [11, 12, 13, 14, 15, 16, 70]]
DECODER_FAMILIES = list(TINY_CONFIGS)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_teacher_logits_rank_the_routing_the_engine_executed(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs[family]
    traces = collect_traces(expertflow.from_pretrained(model_dir), PROMPTS,
                            TracingConfig(dataset="ids", max_new_tokens=5, batch_size=2))
    teacher = RouterTeacher.load(model_dir)
    batched = teacher.logits_of([s.token_ids for s in traces.sequences], progress=False, batch_size=2)
    k = traces.header.top_k
    for seq, logits in zip(traces.sequences, batched):
        assert logits.shape == (seq.num_tokens, traces.header.num_layers, traces.header.num_experts)
        # the routed experts hold the k highest logits; float16 keeps ~3 digits, so near-ties may swap
        scores = logits.astype(np.float32)
        routed = np.zeros(scores.shape, dtype=bool)
        np.put_along_axis(routed, seq.routing.astype(np.int64), True, axis=-1)
        lowest_routed = np.where(routed, scores, np.inf).min(-1)
        highest_other = np.where(routed, -np.inf, scores).max(-1)
        assert (lowest_routed >= highest_other - 1e-2 * np.maximum(1.0, np.abs(highest_other))).all()
        top = np.sort(np.argsort(-scores, axis=-1, kind="stable")[..., :k], -1)
        assert (top == np.sort(seq.routing, -1)).all(-1).mean() > 0.9
        alone = teacher.logits([seq.token_ids])[0]
        np.testing.assert_allclose(alone.astype(np.float32), logits.astype(np.float32), atol=2e-3)


def test_encoder_decoder_models_are_refused(tmp_path: Path) -> None:
    model = AutoModelForSeq2SeqLM.from_config(switch_config(vocab_size=64), dtype=torch.float32)
    model.save_pretrained(tmp_path / "switch")
    with pytest.raises(ExpertflowError, match="decoder-only"):
        RouterTeacher.load(tmp_path / "switch")


def test_distillation_loss_is_bce_plus_weighted_kl_of_standardised_logits() -> None:
    E, L = 4, 2
    torch.manual_seed(0)
    model = RoutingPathModel(PredictorConfig(vocab_size=16, num_layers=L, num_experts=E, top_k=1, d_model=8,
                                             d_ff=16, num_heads=2, window=4, dropout=0.0)).eval()
    ids = np.array([3, 9, 4])
    routing = np.array([[[1], [2]], [[0], [3]], [[2], [2]]], dtype=np.int16)
    soft = np.random.default_rng(0).normal(size=(3, L, E)).astype(np.float16)
    config = TrainConfig(distill_weight=0.5, distill_temperature=2.0)
    loss, _, count, bce = _loss(model, [(ids, routing, soft)], E, config)
    logits = model(torch.as_tensor(ids)[None])[0]                                   # (S, L, E)
    teacher = torch.as_tensor(soft.astype(np.float32))
    z = lambda x: (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)  # noqa: E731
    p = F.softmax(z(teacher) / 2.0, -1)
    kl = (p * (p.log() - F.log_softmax(z(logits) / 2.0, -1))).sum(-1) * 4.0 / E     # (S, L), times T^2
    targets = F.one_hot(torch.as_tensor(routing[..., 0].astype(np.int64)), E).float()
    expected_bce = F.binary_cross_entropy_with_logits(logits, targets)
    assert count == 6
    torch.testing.assert_close(bce, expected_bce)
    torch.testing.assert_close(loss, expected_bce + 0.5 * kl.mean())


def test_train_config_rejects_bad_distillation_settings() -> None:
    with pytest.raises(ValueError, match="distill_weight must be >= 0"):
        TrainConfig(distill_weight=-1.0)
    with pytest.raises(ValueError, match="distill_temperature > 0"):
        TrainConfig(distill_temperature=0.0)


def test_training_with_a_teacher_learns_the_models_routing(tiny_mixtral_dir: Path) -> None:
    prompts = [[int(t) for t in np.random.default_rng(i).integers(3, 96, 12)] for i in range(24)]
    traces = collect_traces(expertflow.from_pretrained(tiny_mixtral_dir), prompts,
                            TracingConfig(dataset="ids", max_new_tokens=8, batch_size=8))
    h = traces.header
    config = PredictorConfig(vocab_size=h.vocab_size, num_layers=h.num_layers, num_experts=h.num_experts,
                             top_k=h.top_k, d_model=32, d_ff=64, num_heads=2, encoder_layers=1,
                             decoder_layers=1, window=8, dropout=0.0)
    result = train_predictor([traces], config, TrainConfig(epochs=6, batch_size=4, lr=5e-3, warmup_steps=2,
                                                           val_fraction=0.25, patience=6),
                             progress=False, teacher=RouterTeacher.load(tiny_mixtral_dir))
    first, best = result.history[0], result.history[result.best_epoch - 1]
    assert best["val_loss"] < first["val_loss"] and best["val_recall"] > first["val_recall"]


def test_train_predictor_cli_with_distill_model(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    traces = collect_traces(expertflow.from_pretrained(tiny_model_dirs["mixtral"]), PROMPTS,
                            TracingConfig(dataset="ids", max_new_tokens=4))
    path = write_traces(traces, tmp_path / "t.safetensors")
    common = ["train-predictor", "--traces", str(path), "--epochs", "1", "--d-model", "16", "--d-ff", "32",
              "--num-heads", "2", "--val-fraction", "0"]
    assert cli_main([*common, "--out", str(tmp_path / "rpp"), "--distill-model", str(tiny_model_dirs["mixtral"]),
                     "--distill-weight", "0.5"]) == 0
    summary = json.loads((tmp_path / "rpp" / "training.json").read_text())
    assert summary["distill_model"] == str(tiny_model_dirs["mixtral"]) and summary["train"]["distill_weight"] == 0.5
    capsys.readouterr()
    assert cli_main([*common, "--out", str(tmp_path / "bad"), "--distill-model", str(tiny_model_dirs["gpt_oss"])]) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("expertflow: error: --distill-model has 2 MoE layers")
    assert errors[0].endswith("pass the traced model")
    assert not (tmp_path / "bad").exists()
