"""`expertflow serve --replicas`: engine replicas as Ray actors behind the one app. Concurrent requests each
equal their greedy output alone, a replica killed mid-run fails only its requests (5xx error objects) and
comes back, and a plain `serve` never imports Ray."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

import expertflow
from expertflow.cli import main as cli_main
from expertflow.datasets import load_prompts

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from expertflow.server import ServeConfig  # noqa: E402
from expertflow.server.app import create_app  # noqa: E402
from tests.serving import serving_app  # noqa: E402

MODEL = "tiny-mixtral-32e"


def test_serve_without_replicas_does_not_import_ray() -> None:
    code = ("import sys, expertflow; from expertflow.server import ServeConfig, build_service;"
            "from expertflow.server.app import create_app; import expertflow.cli.serve, expertflow.distributed.placement;"
            "m = expertflow.from_pretrained(cache_experts=64); create_app(build_service(m, ServeConfig()));"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_placement_needs_replicas(capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["serve", "--placement", "round-robin"]) == 2
    assert "needs --replicas" in capsys.readouterr().err


@pytest.fixture(scope="module")
def model():
    model = expertflow.from_pretrained(cache_experts=64)   # tokenizes for the server, and gives the references
    yield model
    model.close()


@pytest.fixture(scope="module")
def served(model) -> Iterator[tuple[str, object]]:
    """Two replicas on a local Ray cluster behind the app; yields (base URL, the router)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'expertflow-moe[ray]'")
    from expertflow.distributed.replicas import ReplicaConfig, build_replica_service

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        service = build_replica_service(model, ServeConfig(max_batch_size=4), ReplicaConfig(replicas=2, threads=1))
        with serving_app(create_app(service)) as base:
            yield base, service.loop
    finally:
        ray.shutdown()


def expected(model, prompts: list[str], n: int) -> list[str]:
    return [model.decode(model.generate(input_ids=[model.encode(p)], max_new_tokens=n).sequences[0])
            for p in prompts]


async def ask_all(base: str, prompts: list[str], max_tokens: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        return list(await asyncio.gather(*[client.post("/v1/completions", json={
            "model": MODEL, "prompt": p, "max_tokens": max_tokens, "temperature": 0}) for p in prompts]))


def test_two_replicas_answer_16_concurrent_requests_each_equal_to_greedy_alone(served, model) -> None:
    base, router = served
    prompts = [p[:60] for p in load_prompts("alpaca", limit=16)]
    responses = asyncio.run(ask_all(base, prompts, 4))
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses if r.status_code != 200]
    assert [r.json()["choices"][0]["text"] for r in responses] == expected(model, prompts, 4)
    with httpx.stream("POST", base + "/v1/completions", json={"model": MODEL, "prompt": prompts[0], "max_tokens": 4,
                                                              "temperature": 0, "stream": True}, timeout=60) as s:
        chunks = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "data: [DONE]" and len(chunks) > 2
    health = httpx.get(base + "/health").json()
    # No predictor was given: routing-aware placement falls back to round-robin, and says so.
    assert health["placement"] == "round-robin" and [r["state"] for r in health["replicas"]] == ["ok", "ok"]
    metrics = httpx.get(base + "/metrics").json()
    assert metrics["requests"]["succeeded"] >= 16 and metrics["cache"]["capacity_experts"] == 128
    assert all(r["cache_hit_ratio"] is not None for r in metrics["replicas"])


def test_a_killed_replica_fails_only_its_requests_and_is_replaced(served, model) -> None:
    import ray

    base, router = served
    prompts = [p[:60] for p in load_prompts("alpaca", limit=24)[16:24]]

    async def kill_mid_run() -> list[httpx.Response]:
        asked = asyncio.create_task(ask_all(base, prompts, 48))
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + 60
            while (await client.get("/health")).json()["replicas"][0]["running"] == 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # let it decode a few tokens first
        ray.kill(router.handles[0], no_restart=False)
        return await asked

    responses = asyncio.run(kill_mid_run())
    failed = [r for r in responses if r.status_code != 200]
    assert failed and len(failed) < len(responses)
    for r in failed:
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
    want = expected(model, prompts, 48)
    for r, text in zip(responses, want):
        if r.status_code == 200:
            assert r.json()["choices"][0]["text"] == text
    deadline = time.monotonic() + 180  # a hang guard: restarting loads a model, slow on a loaded 2-core box
    while (replica := httpx.get(base + "/health").json()["replicas"][0])["state"] != "ok":
        assert time.monotonic() < deadline, replica
        time.sleep(0.2)
    assert replica["restarts"] == 1 and replica["failed_sequences"] == len(failed)
    again = asyncio.run(ask_all(base, prompts[:4], 4))
    assert [r.status_code for r in again] == [200] * 4
    assert [r.json()["choices"][0]["text"] for r in again] == expected(model, prompts[:4], 4)
