"""The `expertflow` command: output contract and one-line errors on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from expertflow.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what test setup printed
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _assert_one_line_error(rc: int, err: str, needle: str) -> None:
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("expertflow: error: ")
    assert needle in lines[0]
    assert "Traceback" not in err


def test_generate_json_contract(capsys):
    rc, out, _ = _run(capsys, "generate", "--prompt", "The capital of France is", "--max-new-tokens", "6",
                      "--cache-experts", "16", "--store", "disk", "--json")
    assert rc == 0
    payload = json.loads(out.strip().splitlines()[-1])
    for field in ("text", "token_ids", "tokens_per_s", "hit_ratio", "expert_loads", "bytes_moved",
                  "peak_expert_bytes", "all_expert_bytes"):
        assert field in payload
    assert len(payload["token_ids"]) == 6 or payload["token_ids"][-1] == 0
    assert payload["peak_expert_bytes"] <= 16 * (393216 + 4096)  # a zero-copy disk slot holds a page spare
    assert payload["all_expert_bytes"] == 256 * 393216
    assert payload["text"] in out.splitlines()[0] + "\n" + "\n".join(out.splitlines()[1:])


def test_missing_model_dir(capsys, tmp_path):
    rc, _, err = _run(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    _assert_one_line_error(rc, err, "does not exist")


def test_missing_safetensors(capsys, tmp_path, tiny_mixtral_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_mixtral_dir / "config.json", bare)
    rc, _, err = _run(capsys, "generate", "--model", str(bare), "--prompt", "hi")
    _assert_one_line_error(rc, err, "no model.safetensors")


def test_truncated_safetensors(capsys, tmp_path, tiny_mixtral_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_mixtral_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    rc, _, err = _run(capsys, "generate", "--model", str(broken), "--prompt", "hi")
    _assert_one_line_error(rc, err, "truncated")


def test_missing_shard(capsys, tmp_path, embedded_model_dir):
    partial = tmp_path / "partial"
    shutil.copytree(embedded_model_dir, partial)
    (partial / "model-00002-of-00002.safetensors").unlink()
    rc, _, err = _run(capsys, "generate", "--model", str(partial), "--prompt", "hi")
    _assert_one_line_error(rc, err, "model-00002-of-00002.safetensors is missing")


def test_unsupported_architecture(capsys, tmp_path):
    config = AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=32)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "llama")
    rc, _, err = _run(capsys, "generate", "--model", str(tmp_path / "llama"), "--prompt", "hi")
    _assert_one_line_error(rc, err, "unsupported architecture LlamaForCausalLM")
    assert "MixtralForCausalLM" in err and "DeepseekV3ForCausalLM" in err


@pytest.mark.parametrize("flags,minimum", [(("--cache-experts", "15"), 16), (("--cache-bytes", "1MiB"), 16),
                                           (("--cache-experts", "255", "--policy", "none"), None)])
def test_budget_too_small(capsys, flags, minimum):
    rc, _, err = _run(capsys, "generate", "--prompt", "hi", *flags)
    _assert_one_line_error(rc, err, f"minimum of {minimum}" if minimum else "it keeps every expert resident")


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(capsys, prompt):
    rc, _, err = _run(capsys, "generate", "--prompt", prompt)
    _assert_one_line_error(rc, err, "empty prompt")


def test_bad_size_and_context(capsys):
    rc, _, err = _run(capsys, "generate", "--prompt", "hi", "--cache-bytes", "lots")
    _assert_one_line_error(rc, err, "cannot read size 'lots'")
    rc, _, err = _run(capsys, "generate", "--prompt", "hi", "--max-new-tokens", "5000")
    _assert_one_line_error(rc, err, "exceeds the model's context of 1024")


@pytest.mark.parametrize("command", [("generate", "--prompt", "hi"), ("serve",)], ids=["generate", "serve"])
@pytest.mark.parametrize("threads", ["0", "-2"])
def test_bad_threads(capsys, tmp_path, command, threads):
    """Checked before the model loads: the missing model directory is not what fails."""
    rc, _, err = _run(capsys, *command, "--model", str(tmp_path / "nope"), "--threads", threads)
    _assert_one_line_error(rc, err, f"--threads must be >= 1, got {threads}")


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_generate_threads_sets_torch_threads(capsys, restore_threads):
    torch.set_num_threads(1)
    rc, _, _ = _run(capsys, "generate", "--prompt", "hi", "--max-new-tokens", "1", "--threads", "2")
    assert rc == 0
    assert torch.get_num_threads() == 2


def test_error_as_a_user_sees_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "expertflow", "generate", "--model", str(tmp_path / "x"),
                           "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    assert proc.stdout == ""
