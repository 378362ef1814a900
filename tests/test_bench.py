"""`expertflow bench` end to end on a tiny random model: two systems, files written, figures sane."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest

from expertflow.bench.harness import ModelShape, model_shape, plan_runs, run_bench
from expertflow.bench.plots import write_plots
from expertflow.bench.report import JSON_FIELDS, json_line, markdown, versus, versus_rows, write_results
from expertflow.bench.runners import RUNNERS, run_engine
from expertflow.bench.spec import BenchConfig, CacheSize
from expertflow.bench.systems import SYSTEMS
from expertflow.errors import ExpertflowError


def _prompts(vocab: int = 96, count: int = 3) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(4, 9))] for _ in range(count)]


def test_bench_end_to_end(tiny_mixtral_dir: Path, tmp_path: Path) -> None:
    config = BenchConfig(model=tiny_mixtral_dir, systems=["all-in-memory", "lru"], cache_sizes=[CacheSize("50%")],
                         batch_sizes=[2], out=tmp_path / "out", store="disk", max_new_tokens=6)
    doc = run_bench(config, _prompts())
    write_results(doc, config.out)
    write_plots(doc, config.out)

    saved = json.loads((config.out / "results.json").read_text())
    assert saved["same_tokens"] is True
    assert [(r["system"], r["batch_size"]) for r in saved["results"]] == [("all-in-memory", 2), ("lru", 2)]
    for row in saved["results"]:
        assert row["same_tokens"] and row["mismatched_sequences"] == 0
        assert row["tokens_per_s"] > 0 and row["new_tokens"] > 0
        assert row["prefill_seconds"] > 0
        # tokens after each sequence's first over the run beyond its prefill pass; that pass is timed apart, so
        # on a tiny model it can outlast the run itself, and then the rate is 0, never negative
        later, rest = row["new_tokens"] - len(_prompts()), row["seconds"] - row["prefill_seconds"]
        assert row["decode_tokens_per_s"] == (later / rest if rest > 0 else 0.0)
        assert row["peak_expert_bytes"] > 0 and row["peak_rss_bytes"] > row["peak_fast_tier_bytes"] > 0
        assert 0 < row["hit_ratio"] <= 1
    lru = [r for r in saved["results"] if r["system"] == "lru"]
    assert all(r["cache_experts"] == 12 and r["expert_loads"] > 0 for r in lru)  # 50% of 3 layers x 8 experts
    assert 0 < lru[0]["belady_loads"] <= lru[0]["expert_loads"]
    assert lru[0]["loads_vs_belady"] == lru[0]["expert_loads"] / lru[0]["belady_loads"]
    assert saved["results"][0]["belady_loads"] is None  # all-in-memory has no cache to replay
    assert saved["results"][0]["belady_ceiling_tokens_per_s"] is None
    # no read timed before the sweep: lru's ceiling uses its own reads, one per load
    assert lru[0]["notes"]["transfer_reads"] == lru[0]["expert_loads"] >= 20
    assert lru[0]["read_ms_from"] == "the run's own reads"
    assert lru[0]["read_ms"] == 1e3 * lru[0]["notes"]["transfer_busy_seconds"] / lru[0]["expert_loads"] > 0
    assert lru[0]["belady_ceiling_tokens_per_s"] > 0
    everything = saved["results"][0]
    assert lru[0]["peak_expert_bytes"] <= everything["peak_expert_bytes"] // 2
    assert "page cache bypassed" in saved["setup"]["disk_reads"] == lru[0]["notes"]["slow_tier_reads"]

    line = json_line(saved)
    assert line["same_tokens"] is True and set(JSON_FIELDS) <= set(line["results"][0])
    assert "| lru | 12 (50%) | 2 |" in (config.out / "results.md").read_text()
    for name in ("throughput.png", "memory.png", "hit_ratio.png"):
        assert (config.out / name).read_bytes()[:4] == b"\x89PNG"
    assert not list(config.out.glob(".*"))  # no temp files left behind by atomic writes


def test_bench_measures_the_token_scheduler_and_the_predictor_side_by_side(tiny_mixtral_dir: Path,
                                                                           tmp_path: Path) -> None:
    """expertflow and expertflow-no-ts (the paper's "w/o TS"): the same RPP and PLEC, the second with batches in
    prompt order; each row carries its experts per batch forward and the forecast's live B_acc."""
    import torch

    from expertflow.predictor.model import PredictorConfig, RoutingPathModel, save_model

    torch.manual_seed(0)
    rpp = save_model(RoutingPathModel(PredictorConfig(vocab_size=96, num_layers=3, num_experts=8, top_k=2, d_model=16,
                                                      d_ff=32, num_heads=2, window=8, dropout=0.0)), tmp_path / "rpp")
    config = BenchConfig(model=tiny_mixtral_dir, systems=["expertflow", "expertflow-no-ts"],
                         cache_sizes=[CacheSize("50%")], batch_sizes=[2], out=tmp_path / "out", store="host",
                         max_new_tokens=5, predictor=rpp, scheduler="swap", policy_settings={"threshold": 0.3})
    runs = plan_runs(config, model_shape(tiny_mixtral_dir), _prompts(count=4), str(tmp_path))
    assert [(r.system, r.scheduler, r.policy_settings) for r in runs] == [
        ("expertflow", "swap", {"threshold": 0.3}), ("expertflow-no-ts", "fifo", {"threshold": 0.3})]
    doc = run_bench(config, _prompts(count=4))
    assert doc["same_tokens"] is True
    for row in doc["results"]:
        assert row["activated_experts_per_batch"] > 0 and row["notes"]["forecast_accuracy"]["batches"] > 0
        assert 0 < row["forecast_b_acc"] <= 1 and 0 < row["forecast_precision"] <= 1
        assert row["forecast_b_acc"] == row["notes"]["forecast_accuracy"]["b_acc"]
    on, off = doc["results"]
    for row in (on, off):  # a token of a batch of 2 adds 3 (shared) to 6 (3 layers x top-2) distinct pairs
        assert 3 <= row["activated_experts_per_token"] <= 6 and row["notes"]["decode_forwards"] > 0
    text = markdown(doc)
    gain = f"{on['tokens_per_s'] / off['tokens_per_s']:.2f}x"
    assert (f"| 12 (50%) | 2 | {on['notes']['decode_forwards']} / {off['notes']['decode_forwards']} "
            f"| {on['activated_experts_per_batch']:.1f} / {off['activated_experts_per_batch']:.1f} "
            f"| {on['activated_experts_per_token']:.2f} / {off['activated_experts_per_token']:.2f} "
            f"| {on['expert_loads']} / {off['expert_loads']} | {on['tokens_per_s']:.1f} / {off['tokens_per_s']:.1f} "
            f"| {gain} | {on['forecast_b_acc']:.3f} ({on['forecast_precision']:.3f}) / "
            f"{off['forecast_b_acc']:.3f} ({off['forecast_precision']:.3f}) |") in text
    line = json_line(doc)
    assert set(JSON_FIELDS) <= set(line["results"][0])
    assert [v["vs_best_baseline"] for v in line["expertflow_versus"]] == [None]  # no baseline policy ran


def test_plan_runs_one_per_cache_size_only_where_it_applies(tiny_mixtral_dir: Path, tmp_path: Path) -> None:
    config = BenchConfig(model=tiny_mixtral_dir, systems=["all-in-memory", "accelerate", "lru"],
                         cache_sizes=[CacheSize.parse("10%"), CacheSize.parse("12")], batch_sizes=[4],
                         out=tmp_path)
    runs = plan_runs(config, model_shape(tiny_mixtral_dir), _prompts(), str(tmp_path))
    # 10% of 24 experts is below one token's experts in every layer (3 x top-2), so it is raised to 6.
    # Systems without a cache first, then each size's systems back to back (closest in time).
    assert [(r.system, r.cache_experts) for r in runs] == [
        ("all-in-memory", None), ("accelerate", 6), ("lru", 6), ("accelerate", 12), ("lru", 12)]
    assert all(not r.page_cache and r.scheduler == "fifo" and r.io_threads == 1 for r in runs)


@pytest.mark.parametrize("text", ["0", "-3", "150%", "ten", "5.5"])
def test_bad_cache_sizes_are_one_line_errors(text: str) -> None:
    with pytest.raises(ExpertflowError, match="--cache-experts"):
        CacheSize.parse(text)


def test_every_system_has_a_runner_and_engine_systems_run_the_engine() -> None:
    assert list(RUNNERS) == list(SYSTEMS)
    assert all((RUNNERS[name] is run_engine) == (system.policy is not None) for name, system in SYSTEMS.items())


def test_config_checks_systems_and_predictor(tiny_mixtral_dir: Path, tmp_path: Path) -> None:
    base = dict(model=tiny_mixtral_dir, cache_sizes=[CacheSize("10%")], batch_sizes=[1], out=tmp_path)
    with pytest.raises(ExpertflowError, match="unknown system 'fast'"):
        BenchConfig(systems=["lru", "fast"], **base)
    with pytest.raises(ExpertflowError, match="--predictor"):
        BenchConfig(systems=["expertflow"], **base)
    with pytest.raises(ExpertflowError, match="system expertflow-no-ts plans from a routing predictor"):
        BenchConfig(systems=["lru", "expertflow-no-ts"], **base)


def test_bench_plans_the_embedded_model_and_its_widened_copies_from_the_shipped_predictor(
        tiny_mixtral_dir: Path, tmp_path: Path) -> None:
    from expertflow.cli.bench import _predictor
    from expertflow.embedded import EMBEDDED_MODEL_DIR, EMBEDDED_PREDICTOR_DIR

    def args(model: Path, predictor: Path | None = None) -> argparse.Namespace:
        return argparse.Namespace(model=model, predictor=predictor)

    assert _predictor(args(EMBEDDED_MODEL_DIR)) == EMBEDDED_PREDICTOR_DIR  # --widen N widens this --model
    assert _predictor(args(EMBEDDED_MODEL_DIR, tmp_path)) == tmp_path
    assert _predictor(args(tiny_mixtral_dir)) is None  # another model: BenchConfig asks for --predictor


def test_markdown_names_the_reference(tmp_path: Path) -> None:
    doc = {"same_tokens": False, "setup": {"prompts": 1, "dataset": "d", "max_new_tokens": 2, "threads": 1,
                                           "store": "disk", "token_reference": "all-in-memory, batch 1"},
           "results": [{"system": "lru", "cache_experts": 2, "cache_share": 0.5, "batch_size": 1, "tokens_per_s": 3.0,
                        "prefill_seconds": 0.5, "decode_tokens_per_s": 4.0,
                        "hit_ratio": 0.5, "expert_loads": 1, "peak_fast_tier_bytes": 10, "peak_rss_bytes": 20,
                        "same_tokens": False, "mismatched_sequences": 1}]}
    text = markdown(doc)
    assert "no (1 differ)" in text and "token_reference**: all-in-memory, batch 1" in text


def test_expertflow_against_every_system_uses_the_sweeps_sizes_and_the_fastest_baseline(tmp_path: Path) -> None:
    def row(system: str, planned: int | None, batch: int, speed: float, fast_tier: int, own: int | None = None,
            ceiling: float | None = None) -> dict:
        experts = own or planned or 16
        return {"system": system, "cache_experts": experts, "cache_share": experts / 16,
                "planned_cache_experts": planned, "batch_size": batch, "tokens_per_s": speed,
                "peak_fast_tier_bytes": fast_tier, "belady_ceiling_tokens_per_s": ceiling}

    doc = {"results": [
        row("all-in-memory", None, 1, 40.0, 1000), row("accelerate", 4, 1, 2.0, 300),
        row("lru", 4, 1, 10.0, 200), row("ring", 4, 1, 12.0, 200), row("pregated", 4, 1, 8.0, 200),
        row("lru", 8, 1, 99.0, 300),  # another cache size: not a peer of the 4-slot runs
        row("expertflow", 4, 1, 18.0, 150, own=3, ceiling=30.0),  # the engine sized 3 slots from the 4-slot budget
        row("expertflow", 4, 2, 20.0, 150)]}  # nothing else ran at batch 2
    first, second = versus(doc)
    assert first == {"cache_experts": 3, "cache_share": 3 / 16, "batch_size": 1, "tokens_per_s": 18.0,
                     "vs_all_in_memory": 18.0 / 40.0, "belady_ceiling_vs_all_in_memory": 30.0 / 40.0,
                     "vs_accelerate": 9.0, "best_baseline": "ring", "vs_best_baseline": 1.5, "fast_tier_saving": 0.85}
    assert second["vs_all_in_memory"] is None and second["best_baseline"] is None and second["vs_accelerate"] is None
    table = ["| " + " | ".join(str(c) for c in r) + " |" for r in versus_rows(doc)]
    assert table == ["| 3 (19%) | 1 | 18.0 | 0.45x | 0.75x | 9.00x | 1.50x (ring) | 85.0% |",
                     "| 4 (25%) | 2 | 20.0 | - | - | - | - | - |"]


def test_bench_runs_an_encoder_decoder_model(tmp_path: Path) -> None:
    """Switch Transformers through the same harness: transformers' seq2seq generate vs the offloaded engine."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from tests.test_switch import switch_config

    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(switch_config(), dtype=torch.float32).save_pretrained(tmp_path / "switch")
    config = BenchConfig(model=tmp_path / "switch", systems=["all-in-memory", "lru"],
                         cache_sizes=[CacheSize("50%")], batch_sizes=[2], out=tmp_path / "out", max_new_tokens=5)
    doc = run_bench(config, _prompts(vocab=8192, count=4))
    assert doc["same_tokens"] is True
    lru = [r for r in doc["results"] if r["system"] == "lru"][0]
    assert lru["cache_experts"] == 16 and lru["expert_loads"] > 0 and 0 < lru["hit_ratio"] <= 1


def test_io_threads_reach_every_run(tiny_mixtral_dir: Path, tmp_path: Path) -> None:
    config = BenchConfig(model=tiny_mixtral_dir, systems=["lru", "ring"], cache_sizes=[CacheSize("50%")],
                         batch_sizes=[1], out=tmp_path, io_threads=4)
    runs = plan_runs(config, model_shape(tiny_mixtral_dir), _prompts(), str(tmp_path))
    assert [r.io_threads for r in runs] == [4, 4]
    with pytest.raises(ExpertflowError, match="--io-threads"):
        BenchConfig(model=tiny_mixtral_dir, systems=["lru"], cache_sizes=[CacheSize("50%")], batch_sizes=[1],
                    out=tmp_path, io_threads=0)


def test_repeats_report_each_points_median_run_and_check_every_runs_tokens(tmp_path: Path) -> None:
    from expertflow.bench.harness import _document

    config = BenchConfig(model=tmp_path, systems=["all-in-memory", "lru"], cache_sizes=[CacheSize.parse("50%")],
                         batch_sizes=[1], out=tmp_path / "out", repeats=3)

    def run(system: str, speed: float, tokens: list[list[int]]) -> dict:
        return {"system": system, "cache_experts": 8 if system == "lru" else 16, "batch_size": 1,
                "tokens_per_s": speed, "expert_loads": int(speed), "sequences": tokens, "notes": {}}

    same, other = [[1, 2], [3]], [[1, 2], [4]]
    rows = [run("all-in-memory", 30.0, same), run("lru", 9.0, same),
            run("all-in-memory", 40.0, same), run("lru", 7.0, same),
            run("all-in-memory", 20.0, same), run("lru", 8.0, other)]
    doc = _document(config, ModelShape(2, 8, 2), [[5, 6]], rows)
    memory, lru = doc["results"]
    assert (memory["tokens_per_s"], memory["tokens_per_s_runs"]) == (30.0, [30.0, 40.0, 20.0])
    assert (lru["tokens_per_s"], lru["expert_loads"]) == (8.0, 8)  # the median run's own figures
    assert lru["mismatched_sequences"] == 1 and not lru["same_tokens"] and not doc["same_tokens"]
    assert doc["setup"]["repeats"] == 3
    with pytest.raises(ExpertflowError, match="--repeats must be"):
        BenchConfig(model=tmp_path, systems=["lru"], cache_sizes=[CacheSize.parse("50%")], batch_sizes=[1],
                    out=tmp_path / "out", repeats=0)


def test_belady_ceiling_is_the_slower_of_belady_reads_and_all_in_memory_compute() -> None:
    from expertflow.bench.harness import belady_ceiling

    row = {"new_tokens": 100, "belady_loads": 50, "read_ms": 20.0}
    assert belady_ceiling(row, {"seconds": 0.5}) == 100.0  # 50 reads x 20 ms = 1 s, above the 0.5 s compute
    assert belady_ceiling(row, {"seconds": 2.0}) == 50.0   # compute-bound: no cache can beat it
    assert belady_ceiling(row, None) is None
    assert belady_ceiling({**row, "read_ms": None}, {"seconds": 0.5}) is None
    assert belady_ceiling({**row, "belady_loads": None}, {"seconds": 0.5}) is None


def test_a_ceilings_read_cost_is_the_runs_own_busy_time_per_read_when_it_read_enough() -> None:
    from expertflow.bench.harness import MIN_OWN_READS, read_ms

    costs = {"load_ms": 7.0}
    own = {"transfer_reads": 40, "transfer_busy_seconds": 0.2, "busy_ms_per_read": 5.0}
    assert read_ms(own, costs) == (5.0, "the run's own reads")  # 200 ms busy over 40 reads
    few = {"transfer_reads": MIN_OWN_READS - 1, "transfer_busy_seconds": 1.0, "busy_ms_per_read": 52.6}
    assert read_ms(few, costs) == (7.0, "one read timed before the sweep")
    assert read_ms({}, costs) == (7.0, "one read timed before the sweep")
    assert read_ms({}, None) == (None, "none")


def test_bench_skips_prompts_and_says_when_none_are_left(tmp_path: Path, capsys) -> None:
    from expertflow.cli import main
    from expertflow.cli.bench import _prompt_ids
    from expertflow.embedded import EMBEDDED_MODEL_DIR

    assert _prompt_ids(EMBEDDED_MODEL_DIR, "alpaca", 2, skip=800)[0] == _prompt_ids(EMBEDDED_MODEL_DIR, "alpaca", 801)[800]
    capsys.readouterr()
    assert main(["bench", "--skip", "5000", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no prompts after skipping 5000; lower --skip" in err
