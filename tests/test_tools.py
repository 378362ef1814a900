"""The scripts in tools/ run against the package as it is: each answers --help, and the cheap ones make a tiny
real run (a subprocess, as a person runs them) whose output is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from expertflow.embedded import EMBEDDED_MODEL_DIR
from expertflow.traces import TraceHeader, TraceSequence, TraceSet
from tests.tiny_models import save_tiny_model

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"


def run_tool(name: str, *args: object) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(TOOLS / f"{name}.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def last_json(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def docstring_title(path: Path) -> str:
    return path.read_text().split('"""')[1].splitlines()[0]


@pytest.mark.parametrize("tool", sorted(TOOLS.glob("*.py")), ids=lambda p: p.stem)
def test_every_tool_answers_help_with_its_docstring_title(tool: Path) -> None:
    out = run_tool(tool.stem, "--help").stdout
    assert out.startswith("usage: ")
    assert " ".join(docstring_title(tool).split()) in " ".join(out.split())


def test_tiny_switch32_writes_a_32_expert_switch_checkpoint_with_a_tokenizer(tmp_path: Path) -> None:
    out = tmp_path / "tiny-switch32"
    assert run_tool("tiny_switch32", "--out", out).stdout.strip() == f"wrote {out}"
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_experts"], config["num_sparse_decoder_layers"]) == \
        ("switch_transformers", 32, 3)
    assert (out / "model.safetensors").stat().st_size > 0 and (out / "tokenizer.json").is_file()


def test_disk_reads_reads_every_method_at_each_thread_count(tmp_path: Path) -> None:
    model = save_tiny_model("mixtral", tmp_path / "tiny-mixtral")   # 3 layers x 8 experts: 6 passes of 4
    result = last_json(run_tool("disk_reads", "--model", model, "--threads", "1,2", "--experts", "4",
                                "--repeats", "1"))
    rows = result["results"]
    assert [(r["placed"], r["threads"]) for r in rows] == [(True, 1), (True, 2), (False, 1), (False, 2),
                                                           (False, 1), (False, 2)]
    assert all(r["experts"] == 4 and r["mb_per_s"] > 0 and "page cache bypassed" in r["reads"] for r in rows)
    assert all("DONTNEED" in r["reads"] for r in rows[4:])
    assert result["expert_bytes"] == 3 * 16 * 32 * 4                    # w1, w3, w2 of 16 x 32 in float32


def test_scheduler_speed_times_each_scheduler_on_paths_and_probabilities() -> None:
    done = run_tool("scheduler_speed", "--batch-size", "8", "--repeats", "3", "--schedulers", "fifo,swap")
    rows = last_json(done)["results"]
    assert [(r["scheduler"], r["input"]) for r in rows] == [("fifo", "paths"), ("swap", "paths"),
                                                           ("fifo", "probabilities"), ("swap", "probabilities")]
    assert all(r["median_ms"] > 0 and r["distinct_per_batch"] > 0 for r in rows)


def synthetic_traces(path: Path) -> Path:
    """Six short sequences routed at random, shaped like the embedded model's (L=8, E=32, K=2)."""
    rng = np.random.default_rng(0)
    header = TraceHeader(model="synthetic", num_layers=8, num_experts=32, top_k=2, dataset="synthetic")
    def routing() -> np.ndarray:                                        # (12 tokens, L, K)
        return np.stack([np.stack([rng.choice(32, 2, replace=False) for _ in range(8)]) for _ in range(12)])

    sequences = [TraceSequence(rng.integers(0, 100, 6), rng.integers(0, 100, 6), routing()) for _ in range(6)]
    return TraceSet(header, sequences).write(path)


def test_plec_settings_replays_each_setting_against_belady_with_the_shipped_predictor(tmp_path: Path) -> None:
    traces = synthetic_traces(tmp_path / "synthetic.safetensors")
    rows = last_json(run_tool("plec_settings", "--traces", traces, "--threshold", "0.4,0.5",
                              "--cache-experts", "10%", "--batch-size", "1"))["results"]
    assert [(r["threshold"], r["cache_experts"], r["batch_size"]) for r in rows] == [(0.4, 26, 1), (0.5, 26, 1)]
    assert all(r["loads"] > 0 and r["loads_vs_belady"] >= 1.0 for r in rows)


def test_live_scheduling_gives_every_scheduler_the_same_tokens() -> None:
    result = last_json(run_tool("live_scheduling", "--prompts", "4", "--prompt-tokens", "16", "--max-new-tokens", "4",
                                "--batch-sizes", "2", "--units", "2", "--schedulers", "fifo,swap"))
    assert result["same_tokens"] is True
    assert [r["scheduler"] for r in result["results"]] == ["fifo", "swap"]
    assert all(r["expert_loads"] > 0 and r["activated_experts_per_batch"] > 0 for r in result["results"])


def test_serve_load_drives_a_running_server_at_each_concurrency() -> None:
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    import expertflow
    from expertflow.server import ServeConfig, build_service
    from expertflow.server.app import create_app
    from tests.serving import serving_app

    model = expertflow.from_pretrained(cache_experts=64)
    try:
        with serving_app(create_app(build_service(model, ServeConfig(scheduler="fifo", max_batch_size=2)))) as url:
            result = last_json(run_tool("serve_load", "--url", url, "--concurrency", "1,2", "--rounds", "1",
                                        "--min-requests", "2", "--max-tokens", "2", "--prompts", "4",
                                        "--label", "smoke"))
    finally:
        model.close()
    assert result["label"] == "smoke"
    assert [(r["concurrency"], r["requests"]) for r in result["levels"]] == [(1, 2), (2, 2)]
    assert all(0 < r["tokens"] <= 4 and r["p50_s"] > 0 for r in result["levels"])


def test_step_profile_times_a_system_and_its_rules_name_code_that_exists() -> None:
    done = run_tool("step_profile", "--no-sample", "--systems", "lru", "--cache-experts", "64", "--prompts", "1",
                    "--max-new-tokens", "4", "--repeats", "1")
    assert "has no code for these frames" not in done.stderr            # MAIN_RULES match today's modules
    assert "same tokens in every tree and system: True" in done.stdout
    lru = last_json(done)["summary"]["tree"]["lru"]
    assert lru["tokens_per_s"] > 0 and lru["loads"] > 0
    assert last_json(done)["args"]["model"] == str(EMBEDDED_MODEL_DIR)


def test_quant_kernels_times_every_path_and_checks_its_numerics() -> None:
    result = last_json(run_tool("quant_kernels", "--shapes", "tiny-olmoe-64e", "--tokens", "1", "--threads", "1",
                                "--group-sizes", "32", "--libraries", "none", "--min-run-time", "0.01", "--json"))
    assert result["shapes"] == {"tiny-olmoe-64e": {"hidden": 128, "intermediate": 128}}
    methods = ["fp32 F.linear", "int8 packed", "int8 dequant", "int4 g32 packed", "int4 g32 dequant"]
    assert [(r["method"], r["dtype"]) for r in result["forward"]] == \
        [(m, "float32") for m in methods] + [("bf16 F.linear", "bfloat16")] + [(m, "bfloat16") for m in methods[1:]]
    assert all(r["median_us"] > 0 and r["vs_fp32"] > 0 and r["weight_bytes"] > 0 for r in result["forward"])
    assert result["forward"][0]["weight_bytes"] == 3 * 128 * 128 * 4       # gate, up, down in float32
    assert [r["method"] for r in result["dequantize"]] == ["int8 dequant", "int4 g32 dequant"] * 2
    assert all(r["median_us"] > 0 for r in result["dequantize"])
    for r in result["numerics"]:
        assert set(r) >= {"max_abs_error", "rms_relative_error", "batch_invariant", "same_bits_across_threads"}
        if r["dtype"] == "float32" and r["vs_packed_max_abs"] is not None:   # one quantized model, two kernels
            assert r["vs_packed_max_abs"] < 1e-6
