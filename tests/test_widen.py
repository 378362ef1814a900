"""Widened experts (zero padding) leave tokens and routing unchanged while experts get bigger."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import expertflow
from expertflow.cli import main
from expertflow.errors import ExpertflowError
from expertflow.widen import widen_checkpoint

PROMPTS = [[5, 17, 33, 8, 41, 60, 12], [70, 3, 9]]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_widened_model_generates_the_same_tokens_and_routing(tmp_path, tiny_model_dirs, family):
    wide = widen_checkpoint(tiny_model_dirs[family], tmp_path / "wide", intermediate_size=64)
    a = expertflow.from_pretrained(tiny_model_dirs[family], cache_experts=6)
    b = expertflow.from_pretrained(wide, cache_experts=6, store="disk")
    assert b.cache.expert_bytes == a.cache.expert_bytes * 4
    out_a = a.generate(input_ids=PROMPTS, max_new_tokens=10, record_routing=True)
    out_b = b.generate(input_ids=PROMPTS, max_new_tokens=10, record_routing=True)
    assert out_a.sequences == out_b.sequences
    assert all((ra == rb).all() for ra, rb in zip(out_a.routing, out_b.routing))
    torch.testing.assert_close(out_a.last_logits, out_b.last_logits, atol=1e-5, rtol=0)


def test_widen_refuses_shrinking_and_existing_output(capsys, tmp_path, tiny_mixtral_dir):
    with pytest.raises(ExpertflowError, match="below the model's 16"):
        widen_checkpoint(tiny_mixtral_dir, tmp_path / "w", intermediate_size=8)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "notes.txt").write_text("mine")
    capsys.readouterr()
    rc = main(["widen", "--model", str(tiny_mixtral_dir), "--intermediate-size", "32", "--out", str(tmp_path / "exists")])
    assert rc == 2 and "is a non-empty directory; pass --overwrite" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir left behind


def test_a_widened_copy_records_its_source_and_the_embedded_models_copies_plan_from_its_predictor(
        tmp_path, tiny_mixtral_dir):
    from expertflow.cli.bench import _predictor
    from expertflow.config import EngineConfig
    from expertflow.embedded import EMBEDDED_MODEL_DIR, EMBEDDED_PREDICTOR_DIR, shipped_predictor_for
    from expertflow.lineage import RECORD_FILE, fingerprint, origin, write_record

    wide = widen_checkpoint(tiny_mixtral_dir, tmp_path / "wide", intermediate_size=32)
    wider = widen_checkpoint(wide, tmp_path / "wider", intermediate_size=48)
    assert origin(wider) == origin(wide) == tiny_mixtral_dir.resolve()
    assert json.loads((wide / RECORD_FILE).read_text())["source_intermediate_size"] == 16
    # a copy of a copy carries the first model's fingerprint, not its immediate source's
    assert json.loads((wider / RECORD_FILE).read_text())["origin_sha256"] == fingerprint(tiny_mixtral_dir)
    assert shipped_predictor_for(wider) is None  # another model's copy: its own predictor must be given
    assert EngineConfig(model=wider, cache_experts=8, policy="expertflow").predictor is None

    # A copy of the embedded model (its record, without writing 100 MB of padded experts)
    copy = tmp_path / "embedded-wide"
    copy.mkdir()
    write_record(copy, EMBEDDED_MODEL_DIR, 4096, 256)
    assert shipped_predictor_for(copy) == EMBEDDED_PREDICTOR_DIR
    assert EngineConfig(model=copy, cache_experts=64, policy="expertflow").predictor == EMBEDDED_PREDICTOR_DIR
    assert _predictor(argparse.Namespace(model=copy, predictor=None)) == EMBEDDED_PREDICTOR_DIR
    assert _predictor(argparse.Namespace(model=copy, predictor=tmp_path)) == tmp_path

    # The embedded model moved (a reinstalled package): the recorded path is stale, the fingerprint still names it
    record = json.loads((copy / RECORD_FILE).read_text())
    assert record["origin_sha256"] == fingerprint(EMBEDDED_MODEL_DIR)
    (copy / RECORD_FILE).write_text(json.dumps({**record, "source": str(tmp_path / "gone")}))
    assert shipped_predictor_for(copy) == EMBEDDED_PREDICTOR_DIR
    (copy / RECORD_FILE).write_text(json.dumps({**record, "source": str(tmp_path / "gone"), "origin_sha256": "0"}))
    assert shipped_predictor_for(copy) is None

    (copy / RECORD_FILE).write_text("not json")
    with pytest.raises(ExpertflowError, match="is not a widen record"):
        origin(copy)
    (copy / RECORD_FILE).unlink()
    write_record(copy, copy, 4096, 256)  # a record naming itself: a cycle
    with pytest.raises(ExpertflowError, match="form a cycle"):
        origin(copy)
