"""Defaults that fit the user's checkpoint and device: the checkpoint's dtype, the store that keeps the budget
honest on a CPU, one page-cache choice in every command, and a byte budget larger than the model capped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import expertflow
from expertflow.checkpoint import stored_dtype
from expertflow.cli import build_parser, main
from expertflow.cli.options import engine_config
from expertflow.config import EngineConfig, default_store
from expertflow.errors import ExpertflowError
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bf16")
    fp32 = save_tiny_model("mixtral", root / "fp32")
    AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16).save_pretrained(root / "bf16")
    return root / "bf16"


def test_the_dtype_is_the_checkpoints_own_unless_one_is_given(tiny_mixtral_dir: Path, bf16_dir: Path) -> None:
    assert EngineConfig(model=tiny_mixtral_dir).dtype == "float32"
    assert EngineConfig(model=bf16_dir).dtype == "bfloat16"
    assert EngineConfig(model=bf16_dir, dtype="float32").dtype == "float32"
    args = build_parser().parse_args(["generate", "--model", str(bf16_dir), "--prompt", "x"])
    assert args.dtype == "auto" and engine_config(args).dtype == "bfloat16"


def test_without_a_dtype_in_config_json_the_tensors_tell(tmp_path: Path, bf16_dir: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in bf16_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (copy / "config.json").write_text(json.dumps(config))
    assert stored_dtype(copy) == "bfloat16"
    config["torch_dtype"] = "float16"  # the transformers 4 spelling still counts
    (copy / "config.json").write_text(json.dumps(config))
    assert stored_dtype(copy) == "float16"


def test_a_dtype_expertflow_does_not_compute_in_is_one_line(tmp_path: Path, tiny_mixtral_dir: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "f64"
    copy.mkdir()
    config = json.loads((tiny_mixtral_dir / "config.json").read_text())
    config["dtype"] = "float64"
    (copy / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(2, dtype=torch.float64)}, copy / "model.safetensors")
    assert main(["generate", "--model", str(copy), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"expertflow: error: {copy} stores its weights as float64, which expertflow does not compute in; "
                   "pass --dtype float32 or bfloat16 or float16")


def test_the_store_fits_the_device(tiny_mixtral_dir: Path) -> None:
    assert default_store("cpu") == "disk"
    assert default_store("cuda") == default_store("cuda:1") == "host"
    assert EngineConfig(model=tiny_mixtral_dir).store == "disk"
    assert EngineConfig(model=tiny_mixtral_dir, store="host").store == "host"
    args = build_parser().parse_args(["generate", "--model", str(tiny_mixtral_dir), "--prompt", "x"])
    assert args.store is None and engine_config(args).store == "disk"


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["serve"], ["bench"]])
def test_one_page_cache_choice_with_one_default_in_every_command(command: list[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(command).page_cache is False
    assert parser.parse_args([*command, "--page-cache"]).page_cache is True


def test_page_cache_reaches_the_store_and_the_old_flag_still_works(tiny_mixtral_dir: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    base = ["generate", "--model", str(tiny_mixtral_dir), "--prompt", "x", "--cache-experts", "6"]
    assert engine_config(build_parser().parse_args(base)).page_cache is False
    assert engine_config(build_parser().parse_args([*base, "--page-cache"])).page_cache is True
    old = engine_config(build_parser().parse_args([*base, "--disk-direct"]))
    assert old.page_cache is False
    assert capsys.readouterr().err.strip() == (
        "expertflow: note: --disk-direct is the default now (reads bypass the page cache) and will be removed; "
        "drop it, or pass --page-cache for the opposite")
    with pytest.raises(ExpertflowError, match="opposite reads"):
        engine_config(build_parser().parse_args([*base, "--disk-direct", "--page-cache"]))
    with pytest.raises(ExpertflowError, match="--page-cache applies to --store disk only"):
        EngineConfig(model=tiny_mixtral_dir, store="host", page_cache=True)
    cached = expertflow.from_pretrained(tiny_mixtral_dir, cache_experts=6, page_cache=True)
    bypassed = expertflow.from_pretrained(tiny_mixtral_dir, cache_experts=6)
    assert cached.cache.store.read_method == "pread through the OS page cache"
    assert "page cache bypassed" in bypassed.cache.store.read_method


def test_a_byte_budget_above_the_model_is_capped_with_a_note(tiny_mixtral_dir: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    m = expertflow.from_pretrained(tiny_mixtral_dir, cache_bytes="1GiB")
    total = m.num_moe_layers * m.num_experts
    assert m.cache.residency.capacity == total
    slot = m.cache.slot_bytes
    assert m.budget_note == (f"--cache-bytes 1024.00 MiB is more than every expert takes "
                             f"({total * slot / 2**20:.2f} MiB): all {total} experts are resident")
    assert expertflow.from_pretrained(tiny_mixtral_dir, cache_bytes=slot * 6).budget_note is None
    rc = main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "2", "--cache-bytes", "1GiB"])
    assert rc == 0
    assert "expertflow: note: --cache-bytes 1024.00 MiB is more than every expert takes" in capsys.readouterr().err


def test_every_expert_resident_on_a_cpu_is_held_once(tiny_mixtral_dir: Path) -> None:
    """With no budget the slots are the experts' only copy: a host store would hold them a second time."""
    every = expertflow.from_pretrained(tiny_mixtral_dir, store="host")
    assert every.cache.store.name == "disk"
    assert expertflow.from_pretrained(tiny_mixtral_dir, store="host", cache_experts=12).cache.store.name == "host"
    out = every.generate(input_ids=[[5, 17, 33]], max_new_tokens=3)
    assert out.stats.peak_expert_bytes <= out.stats.all_expert_bytes + 24 * 4096  # one copy (+ a spare page a slot)
