"""The paths a GPU user takes, on every device present: a serve round trip and one bench point. On a machine
without CUDA only the CPU cases run (the CUDA ones skip cleanly); `python -m pytest tests -m cuda` runs exactly
the CUDA set, together with the exactness grids marked the same way."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest

import expertflow
from expertflow.bench.harness import run_bench
from expertflow.bench.spec import BenchConfig, CacheSize
from tests.devices import DEVICES

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from expertflow.server import ServeConfig, build_service  # noqa: E402
from expertflow.server.app import create_app  # noqa: E402
from tests.serving import serving_app  # noqa: E402

PROMPT = "The history of the city"


@pytest.mark.parametrize("device", DEVICES)
def test_serve_round_trip_equals_greedy_alone(device: str) -> None:
    """Every expert offloaded to the device's default slow tier (pinned host RAM on CUDA), 25% cached."""
    model = expertflow.from_pretrained(cache_experts=64, device=device)
    alone = expertflow.from_pretrained(cache_experts=64, device=device)
    try:
        ids = model.encode(PROMPT)
        expected = alone.decode(alone.generate(input_ids=[ids], max_new_tokens=8).sequences[0])
        with serving_app(create_app(build_service(model, ServeConfig(max_batch_size=2)))) as url:
            r = httpx.post(url + "/v1/completions", json={"model": "tiny-mixtral-32e", "prompt": PROMPT,
                                                         "max_tokens": 8, "temperature": 0}, timeout=120)
            metrics = httpx.get(url + "/metrics", timeout=10).json()
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
        assert json.dumps(metrics)  # the cache's figures are plain JSON on every device
    finally:
        model.close()
        alone.close()


@pytest.mark.parametrize("device", DEVICES)
def test_one_bench_point_runs_and_every_system_agrees(device: str, tiny_mixtral_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 96) for _ in range(6)] for _ in range(2)]
    config = BenchConfig(model=tiny_mixtral_dir, systems=["all-in-memory", "lru"], cache_sizes=[CacheSize("50%")],
                         batch_sizes=[2], out=tmp_path / "out", device=device, max_new_tokens=4)
    assert config.store == ("disk" if device == "cpu" else "host")
    doc = run_bench(config, prompts)
    assert doc["same_tokens"] is True and doc["setup"]["device"] == device
    lru = next(r for r in doc["results"] if r["system"] == "lru")
    assert lru["cache_experts"] == 12 and lru["expert_loads"] > 0 and lru["tokens_per_s"] > 0
