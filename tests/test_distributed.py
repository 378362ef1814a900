"""Scale-out: `trace --ray` on a local Ray cluster equals the single-process trace (also after a worker dies
mid-share), and routing-aware placement (pure Python, no Ray needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import expertflow
from expertflow.distributed.placement import (PLACEMENTS, ReplicaSet, RoundRobin, RoutingAware, placement_class,
                                              prompt_path)
from expertflow.cli import main as cli_main
from expertflow.traces import TraceSet
from expertflow.trace_collection import TracingConfig, collect_traces

PROMPTS = ["5 17 33", "60 3 9 9", "11 12 13 14", "70 71", "1 2 3 4 5 6"]


class _Words:
    """Whitespace token ids, so the Ray driver and the single-process reference tokenize identically."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": [int(w) for w in text.split()]}


# ---------------------------------------------------------------- placement (pure Python)

def path_of(*pairs: tuple[int, int]) -> frozenset[tuple[int, int]]:
    return frozenset(pairs)


def test_round_robin_cycles_replicas() -> None:
    replicas = ReplicaSet(3)
    policy = RoundRobin()
    assert [policy.choose(path_of((0, i)), replicas) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_routing_aware_joins_the_most_similar_running_batch() -> None:
    replicas = ReplicaSet(2)
    replicas.add(0, path_of((0, 1), (1, 2)))
    replicas.add(1, path_of((0, 5), (1, 6)))
    for metric in ("jaccard", "hamming"):
        policy = RoutingAware(metric=metric, slack=2)
        assert policy.choose(path_of((0, 5), (1, 6), (2, 0)), replicas) == 1
        assert policy.choose(path_of((0, 1), (1, 3)), replicas) == 0


def test_routing_aware_balances_load_within_slack() -> None:
    replicas = ReplicaSet(2)
    policy = RoutingAware(slack=1)
    same = path_of((0, 1), (1, 1))
    placed = []
    for _ in range(6):
        r = policy.choose(same, replicas)
        replicas.add(r, same)
        placed.append(r)
    # Identical requests would all go to one replica by similarity alone; the slack caps the imbalance at 1.
    loads = [placed.count(0), placed.count(1)]
    assert max(loads) - min(loads) <= 1


def test_working_set_counts_and_removal() -> None:
    replicas = ReplicaSet(1)
    a, b = path_of((0, 1), (1, 2)), path_of((0, 1), (1, 3))
    replicas.add(0, a)
    replicas.add(0, b)
    assert replicas.working_set(0) == {(0, 1): 2, (1, 2): 1, (1, 3): 1} and replicas.load(0) == 2
    replicas.remove(0, a)
    assert replicas.working_set(0) == {(0, 1): 1, (1, 3): 1} and replicas.load(0) == 1
    with pytest.raises(ValueError, match="not running"):
        replicas.remove(0, a)


def test_prompt_path_last_token_or_union() -> None:
    probs = np.zeros((3, 2, 4))                     # (S, L, E)
    probs[0, 0, [0, 1]] = 0.9
    probs[2, 0, [2, 3]] = 0.9
    probs[2, 1, [1, 2]] = 0.8
    probs[0, 1, [0, 3]] = 0.7
    assert prompt_path(probs, top_k=2, mode="last") == {(0, 2), (0, 3), (1, 1), (1, 2)}
    assert prompt_path(probs, top_k=2, mode="union") >= {(0, 0), (0, 1), (0, 2), (1, 0), (1, 3)}
    with pytest.raises(ValueError, match="mode"):
        prompt_path(probs, top_k=2, mode="first")


def test_registry_names() -> None:
    assert set(PLACEMENTS) == {"round-robin", "routing"}
    assert placement_class("routing") is RoutingAware
    with pytest.raises(ValueError, match="round-robin"):
        placement_class("random")


# ---------------------------------------------------------------- trace --ray

def test_ray_options_need_ray(capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["trace", "--dataset", "alpaca", "--samples", "1", "--workers", "2", "--out", "x"]) == 2
    assert "need --ray" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'expertflow-moe[ray]'")
    import ray as ray_module

    ray_module.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray_module
    ray_module.shutdown()


def single_process(model_dir: Path, config: TracingConfig) -> TraceSet:
    model = expertflow.from_pretrained(model_dir)
    ids = [_Words()(p)["input_ids"] for p in PROMPTS]
    return collect_traces(model, ids, config, first_index=3)


def assert_same_traces(a: TraceSet, b: TraceSet) -> None:
    assert a.header == b.header and len(a.sequences) == len(b.sequences)
    for x, y in zip(a.sequences, b.sequences):
        assert (x.prompt_index, x.run) == (y.prompt_index, y.run)
        np.testing.assert_array_equal(x.token_ids, y.token_ids)
        np.testing.assert_array_equal(x.routing, y.routing)


def _worker_classes():
    """TraceWorkers with whitespace tokenization (the tiny random model has no tokenizer files); defined
    here, after Ray is known to be importable, and shipped to the workers by value."""
    from expertflow.distributed.tracing import TraceWorker

    class Words(TraceWorker):
        def encode(self, prompts: list[str], max_tokens: int) -> list[list[int]]:
            return [_Words()(p)["input_ids"] for p in prompts]

    class CrashOnce(Words):
        """Kills its own process on its first share (per marker file), as a lost node would."""

        marker: str = ""

        def run_share(self, share, config, first_index):
            if not os.path.exists(self.marker):
                Path(self.marker).touch()
                os._exit(1)
            return super().run_share(share, config, first_index)

    return Words, CrashOnce


def test_trace_on_ray_equals_single_process(ray_cluster, tiny_mixtral_dir: Path) -> None:
    from expertflow.distributed.tracing import RayTraceConfig, collect_traces_ray

    # Sampled runs: each batch's seed must follow it to whichever worker runs it.
    runs = 2
    config = TracingConfig(dataset="words", runs=runs, temperature=1.5, seed=11, max_new_tokens=5, batch_size=2)
    words, _ = _worker_classes()
    done = []
    got = collect_traces_ray(tiny_mixtral_dir, PROMPTS, config, RayTraceConfig(workers=2), on_batch=done.append,
                             first_index=3, worker_class=words)
    assert_same_traces(got, single_process(tiny_mixtral_dir, config))
    assert sum(done) == len(PROMPTS) * runs


def test_trace_on_ray_retries_a_share_whose_worker_died(ray_cluster, tiny_mixtral_dir: Path, tmp_path: Path) -> None:
    from expertflow.distributed.tracing import RayTraceConfig, collect_traces_ray

    config = TracingConfig(dataset="words", seed=3, max_new_tokens=4, batch_size=2)
    _, crash_once = _worker_classes()
    crash_once.marker = str(tmp_path / "crashed")
    got = collect_traces_ray(tiny_mixtral_dir, PROMPTS, config, RayTraceConfig(workers=2), first_index=3,
                             worker_class=crash_once)
    assert (tmp_path / "crashed").exists()
    assert_same_traces(got, single_process(tiny_mixtral_dir, config))
