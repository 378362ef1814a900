"""Policy settings (PLEC's prefetch threshold) from the engine config, generate, simulate and bench: applied,
exact outputs, more prefetches when lower, one-line errors when misplaced or out of range."""

from __future__ import annotations

import json

import pytest

import expertflow
from expertflow.bench.harness import ModelShape, plan_runs
from expertflow.bench.spec import BenchConfig, CacheSize
from expertflow.cli import main
from expertflow.config import EngineConfig
from expertflow.errors import ExpertflowError
from expertflow.cache.policies import build_policy, cli_settings, policy_settings
from expertflow.cache.policies.plec import PLECConfig
from tests.reference import reference_generate
from tests.test_simulator import _synthetic_traces

PROMPTS = ["Describe a process of making crepes.", "Give three tips for staying healthy."]


def test_settings_build_the_policy_with_them() -> None:
    policy = build_policy("expertflow", 40, range(8), 32, 2, {"threshold": 0.2})
    assert policy.config == PLECConfig(threshold=0.2)
    assert build_policy("expertflow", 40, range(8), 32, 2).config == PLECConfig()
    assert policy_settings("expertflow", {}) is None


@pytest.mark.parametrize("name, settings, message", [
    ("lru", {"threshold": 0.2}, "policy 'lru' has no settings (threshold given); threshold applies to policy plec (or expertflow)"),
    ("expertflow", {"treshold": 0.2}, "policy 'expertflow' has no setting 'treshold'; it has beta, decay, lead, refetch_discount, spare_threshold, threshold"),
    ("expertflow", {"threshold": 0.0}, "PLEC threshold is the forecast probability worth a prefetch and must be in (0, 1]"),
])
def test_misplaced_or_bad_settings_are_one_line_errors(name: str, settings: dict, message: str) -> None:
    with pytest.raises(ExpertflowError) as err:
        policy_settings(name, settings)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    with pytest.raises(ExpertflowError, match=message.split(";")[0].replace("(", r"\(").replace(")", r"\)")):
        EngineConfig(cache_experts=64, policy=name, policy_settings=settings)


def test_a_lower_threshold_prefetches_more_and_keeps_outputs_exact(embedded_model_dir) -> None:
    stats = {}
    for threshold in (None, 0.2):
        settings = {} if threshold is None else {"threshold": threshold}
        m = expertflow.from_pretrained(cache_experts=26, policy="expertflow", policy_settings=settings)
        try:
            prompts = [m.encode(p) for p in PROMPTS]
            out = m.generate(input_ids=prompts, max_new_tokens=10)
            expected = reference_generate(embedded_model_dir, prompts, 10, m.engine.parts.pad_token_id)[0]
            assert out.sequences == expected
            stats[threshold] = out.stats
        finally:
            m.close()
    assert stats[0.2].prefetch_loads > stats[None].prefetch_loads
    assert stats[0.2].hits >= stats[None].hits


def test_generate_cli_takes_a_prefetch_threshold(capsys) -> None:
    args = ["generate", "--prompt", "The capital of France is", "--max-new-tokens", "4", "--cache-experts", "26",
            "--json"]
    assert main([*args, "--policy", "expertflow", "--prefetch-threshold", "0.2"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(payload["token_ids"]) == 4
    assert main([*args, "--policy", "lru", "--prefetch-threshold", "0.2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "threshold applies to policy plec (or expertflow)" in err


def test_simulate_cli_takes_a_prefetch_threshold(tmp_path, capsys) -> None:
    traces = _synthetic_traces(tmp_path / "t.safetensors", model="tiny-mixtral-32e")
    args = ["simulate", "--traces", str(traces), "--cache-experts", "64", "--transfer-ratio", "4", "--json"]
    prefetches = {}
    for threshold in ("0.5", "0.2"):
        assert main([*args, "--policies", "expertflow", "--prefetch-threshold", threshold]) == 0
        (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
        prefetches[threshold] = row["prefetch_loads"]
    assert main([*args, "--policies", "expertflow"]) == 0
    (default,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert default["prefetch_loads"] == prefetches["0.5"] < prefetches["0.2"]
    assert main([*args, "--policies", "lru", "--prefetch-threshold", "0.2"]) == 2
    assert "add it to --policies" in capsys.readouterr().err
    assert main([*args, "--policies", "expertflow", "--prefetch-threshold", "1.5"]) == 2
    assert "must be in (0, 1]" in capsys.readouterr().err


def test_bench_config_checks_the_threshold(tmp_path) -> None:
    common = dict(model=tmp_path, cache_sizes=[CacheSize.parse("10%")], batch_sizes=[1], out=tmp_path / "out",
                  predictor=tmp_path)
    with pytest.raises(ExpertflowError, match="apply to system expertflow"):
        BenchConfig(systems=["lru"], policy_settings={"threshold": 0.2}, **common)
    with pytest.raises(ExpertflowError, match=r"must be in \(0, 1\]"):
        BenchConfig(systems=["expertflow"], policy_settings={"threshold": 2.0}, **common)
    with pytest.raises(ExpertflowError, match="lead counts layers ahead"):
        BenchConfig(systems=["expertflow"], policy_settings={"lead": 1.5}, **common)
    config = BenchConfig(systems=["lru", "expertflow"], policy_settings={"threshold": 0.2, "lead": 3}, **common)
    runs = plan_runs(config, ModelShape(8, 32, 2), [[1, 2, 3]], str(tmp_path))
    assert {r.system: r.policy_settings for r in runs} == {"lru": {}, "expertflow": {"threshold": 0.2, "lead": 3}}


def test_cli_settings_parse_pairs_and_the_threshold() -> None:
    assert cli_settings(0.2, ["lead=3", " beta = 0.8"]) == {"lead": 3, "beta": 0.8, "threshold": 0.2}
    assert cli_settings(None, []) == {}
    assert isinstance(cli_settings(None, ["lead=3"])["lead"], int)
    for pair, message in (("lead", "wants KEY=VALUE"), ("=3", "wants KEY=VALUE"), ("lead=soon", "must be a number")):
        with pytest.raises(ExpertflowError, match=message):
            cli_settings(None, [pair])
    with pytest.raises(ExpertflowError, match="disagree"):
        cli_settings(0.2, ["threshold=0.3"])


def test_generate_and_simulate_clis_take_policy_settings(tmp_path, capsys) -> None:
    args = ["generate", "--prompt", "The capital of France is", "--max-new-tokens", "4", "--cache-experts", "26",
            "--json", "--policy", "expertflow"]
    assert main([*args, "--policy-setting", "lead=3", "--policy-setting", "beta=0.8"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]) == 4
    assert main([*args, "--policy-setting", "speed=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no setting 'speed'" in err
    traces = _synthetic_traces(tmp_path / "t.safetensors", model="tiny-mixtral-32e")
    sim = ["simulate", "--traces", str(traces), "--cache-experts", "64", "--transfer-ratio", "4", "--json"]
    assert main([*sim, "--policies", "expertflow", "--policy-setting", "lead=3"]) == 0
    capsys.readouterr()
    assert main([*sim, "--policies", "lru", "--policy-setting", "lead=3"]) == 2
    assert "add it to --policies" in capsys.readouterr().err

