"""`expertflow inspect`: the conformance report per family, and what it refuses."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from expertflow.cli import main
from tests.tiny_models import TINY_CONFIGS

EXPECTED_MOE_LAYERS = {"deepseek_v2": [1, 2], "deepseek_v3": [1, 2], "gpt_oss": [0, 1]}


def _inspect(capsys, model_dir) -> tuple[int, dict | str]:
    capsys.readouterr()
    rc = main(["inspect", "--model", str(model_dir), "--json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out.strip().splitlines()[-1]) if rc == 0 else err)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_inspect_reports_each_family(capsys, tiny_model_dirs, family):
    rc, report = _inspect(capsys, tiny_model_dirs[family])
    assert rc == 0
    moe_layers = EXPECTED_MOE_LAYERS.get(family, [0, 1, 2])
    assert report["moe_layers"] == moe_layers
    assert report["experts_per_layer"] == 8 and report["top_k"] == 2
    assert report["checkpoint_layout"] == ("fused" if family == "gpt_oss" else "per-expert")
    assert report["checkpoint_dtype"] == "float32" and report["sharded"] is False
    assert report["all_expert_bytes"] == report["expert_bytes"] * 8 * len(moe_layers)
    assert report["min_cache_experts"]["lru"] == 2 * len(moe_layers)
    assert report["min_cache_experts"]["none"] == 8 * len(moe_layers)


def test_inspect_embedded_model(capsys, embedded_model_dir):
    rc, report = _inspect(capsys, embedded_model_dir)
    assert rc == 0
    assert report["architecture"] == "MixtralForCausalLM"
    assert report["expert_bytes"] == 393216 and report["all_expert_bytes"] == 256 * 393216
    assert report["sharded"] is True and report["shards"] == 2


def test_inspect_names_an_unsupported_moe_family(capsys, tmp_path):
    config = AutoConfig.for_model("phimoe", hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                  num_experts_per_tok=2, vocab_size=64)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "phimoe")
    rc, err = _inspect(capsys, tmp_path / "phimoe")
    assert rc == 2 and err.count("\n") == 1
    assert "unsupported architecture PhimoeForCausalLM" in err and "GptOssForCausalLM" in err


def test_inspect_names_quantized_experts(capsys, tmp_path, tiny_model_dirs):
    """Hub GPT-OSS ships MXFP4 `*_blocks`/`*_scales` expert tensors: refused up front, by name."""
    src = tiny_model_dirs["gpt_oss"]
    state = load_file(src / "model.safetensors")
    quantized = {k.replace("experts.gate_up_proj", "experts.gate_up_proj_blocks")
                 if k.endswith("experts.gate_up_proj") else k: v for k, v in state.items()}
    (tmp_path / "q").mkdir()
    save_file(quantized, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "q" / "config.json").write_text((src / "config.json").read_text())
    rc, err = _inspect(capsys, tmp_path / "q")
    assert rc == 2 and "quantized" in err and "expert 0 of layer 0" in err
