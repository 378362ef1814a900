"""Trace replay: recorded routing through the same policies, `Residency` and `CachePlanner` as the engine.

Sequences are batched as the engine runs them (consecutive groups of B: one prefill forward, then one forward
per generated token), and each forward runs only the MoE layers its tokens pass. Time is virtual:
`transfer_ratio` expert loads fit in one layer's compute. No torch here.

Shape legend: T tokens of a sequence, L MoE layers, E experts, K top_k. Design: docs/design/simulator.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from expertflow.cache.policies import Forecast, Key, build_policy
from expertflow.cache.policies.forecast import batch_forecast, restrict
from expertflow.cache.planner import USE_AHEAD, CachePlanner
from expertflow.cache.residency import CacheCounters, Residency
from expertflow.traces import NO_EXPERT, TraceSet


@dataclass(frozen=True)
class Forward:
    """One model forward: per MoE layer (in order) the sorted unique experts it uses, its forecast, and
    the MoE layers it runs (None: every one)."""

    experts: tuple[tuple[int, ...], ...]
    forecast: Forecast | None
    prefill: bool
    layers: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SimConfig:
    policy: str
    cache_experts: int
    batch_size: int
    transfer_ratio: float | None = None   # expert loads per layer compute; None = unlimited
    count_prefill: bool = False           # figures over prefill forwards too (they are replayed anyway)
    policy_settings: tuple[tuple[str, float], ...] = ()  # the policy's knobs (name, value), e.g. PLEC's threshold

    def __post_init__(self) -> None:
        if self.cache_experts < 1 or self.batch_size < 1:
            raise ValueError(f"cache_experts and batch_size must be >= 1, got {self.cache_experts}, {self.batch_size}")
        if self.transfer_ratio is not None and self.transfer_ratio < 0:
            raise ValueError(f"transfer_ratio must be >= 0, got {self.transfer_ratio}")


@dataclass
class SimResult:
    config: SimConfig
    counters: CacheCounters                 # over the counted forwards (decode, or all)
    all_counters: CacheCounters = field(default_factory=CacheCounters)
    loads_vs_belady: float | None = None


def batch_forwards(traces: TraceSet, batch_size: int,
                   predictions: Sequence[np.ndarray] | None = None) -> list[Forward]:
    """The forwards the engine would run; `predictions` (per sequence (T, L, E)) give each its forecast."""
    layers = list(range(traces.header.num_layers))
    prompt_layers, decode_layers = forward_layers(traces)
    forwards: list[Forward] = []
    seqs = traces.sequences
    for start in range(0, len(seqs), batch_size):
        group = list(range(start, min(start + batch_size, len(seqs))))
        prompt = [(i, np.arange(len(seqs[i].prompt_ids))) for i in group]
        forwards.append(_forward(traces, prompt, predictions, layers, prompt_layers, prefill=True))
        for j in range(max(len(seqs[i].generated_ids) for i in group)):
            active = [(i, np.array([len(seqs[i].prompt_ids) + j])) for i in group if j < len(seqs[i].generated_ids)]
            forwards.append(_forward(traces, active, predictions, layers, decode_layers, prefill=False))
    return forwards


def forward_layers(traces: TraceSet) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The MoE layers a prompt forward and a decode forward run: those some prompt (generated) token of
    the traces is routed at. Every layer for a decoder-only model; the encoder's and the decoder's for an
    encoder-decoder one (a capacity drop never empties a layer: each expert takes its first tokens)."""
    routed_prompt = np.zeros(traces.header.num_layers, dtype=bool)
    routed_generated = np.zeros(traces.header.num_layers, dtype=bool)
    for seq in traces.sequences:
        routed = (seq.routing != NO_EXPERT).any(axis=2)                                 # (T, L)
        routed_prompt |= routed[: len(seq.prompt_ids)].any(axis=0)
        routed_generated |= routed[len(seq.prompt_ids):].any(axis=0)
    return tuple(np.flatnonzero(routed_prompt).tolist()), tuple(np.flatnonzero(routed_generated).tolist())


def _forward(traces: TraceSet, rows: list[tuple[int, np.ndarray]], predictions: Sequence[np.ndarray] | None,
             layers: list[int], runs: tuple[int, ...], prefill: bool) -> Forward:
    routing = np.concatenate([traces.sequences[i].routing[pos] for i, pos in rows])        # (N, L, K)
    # NO_EXPERT entries (a token of the other stack, or dropped for capacity) use no expert.
    experts = tuple(tuple(np.unique(col[col != NO_EXPERT]).tolist()) for col in routing.transpose(1, 0, 2))
    forecast = None
    if predictions is not None:
        forecast = restrict(batch_forecast(np.concatenate([predictions[i][pos] for i, pos in rows]), layers), runs)
    return Forward(experts, forecast, prefill, runs)


def accesses(forwards: Sequence[Forward], layers: Sequence[int]) -> list[Key]:
    """Every demand use, in replay order: what Belady's MIN needs to see ahead."""
    return [(layers[li], e) for fw in forwards for li, experts in enumerate(fw.experts) for e in experts]


def simulate(forwards: Sequence[Forward], layers: Sequence[int], num_experts: int, top_k: int,
             config: SimConfig) -> SimResult:
    """Replay `forwards` through config.policy, built with config.policy_settings (its defaults if none)."""
    policy = build_policy(config.policy, config.cache_experts, layers, num_experts, top_k,
                          dict(config.policy_settings))
    if policy.needs_future:
        policy.set_future(accesses(forwards, layers))
    residency = Residency(config.cache_experts, policy)
    for key in policy.initial_residents():
        residency.preload(key)
    planner = CachePlanner(residency, config.transfer_ratio, USE_AHEAD if policy.prefetches else 0)
    start = residency.counters.copy()
    counted = CacheCounters()
    for fw in forwards:
        before = residency.counters.copy()
        replay_forward(planner, fw, layers)
        if config.count_prefill or not fw.prefill:
            counted = _plus(counted, residency.counters.minus(before))
    return SimResult(config, counted, residency.counters.minus(start))


def belady_loads(uses: Sequence[Key], capacity: int, layers: Sequence[int], num_experts: int, top_k: int,
                 resident: Sequence[Key] = ()) -> int:
    """Belady's MIN loads for a demand sequence (a live run's `record_uses`), starting with `resident`
    in the cache: the fewest loads any policy, prefetching or not, could have served those uses with."""
    policy = build_policy("belady", capacity, layers, num_experts, top_k)
    policy.set_future(uses, resident)
    residency = Residency(capacity, policy)
    for key in policy.initial_residents():
        residency.preload(key)
    warm = residency.counters.loads
    for key in uses:
        residency.use(key)
    return residency.counters.loads - warm


def replay_forward(planner: CachePlanner, fw: Forward, layers: Sequence[int]) -> None:
    """One forward over its layers, in the order OffloadedExperts drives the live cache."""
    runs = set(layers if fw.layers is None else fw.layers)
    planner.begin_step(fw.forecast, None if fw.layers is None else fw.layers)
    for layer, experts in zip(layers, fw.experts):
        if layer not in runs:  # the encoder's in a decoder step, and vice versa
            continue
        keys = [(layer, e) for e in experts]
        planner.route(layer, keys)
        for key in keys:
            planner.use(key)
            planner.release(key)
        planner.finish_layer(layer)


def _plus(a: CacheCounters, b: CacheCounters) -> CacheCounters:
    return CacheCounters(**{f: getattr(a, f) + getattr(b, f) for f in a.__dataclass_fields__})


def sweep(traces: TraceSet, policies: Sequence[str], cache_sizes: Sequence[int], batch_sizes: Sequence[int],
          transfer_ratio: float | None, predictions: Sequence[np.ndarray] | None = None,
          count_prefill: bool = False, settings: Mapping[str, Mapping[str, float]] | None = None) -> list[SimResult]:
    """Every policy at every (cache size, batch size), each with its loads relative to Belady's MIN.
    `settings`: per policy name, its knobs (the others run their defaults)."""
    knobs = {name: tuple(sorted((settings or {}).get(name, {}).items())) for name in ["belady", *policies]}
    h = traces.header
    layers = list(range(h.num_layers))
    results: list[SimResult] = []
    for batch_size in batch_sizes:
        forwards = batch_forwards(traces, batch_size, predictions)
        for cache in cache_sizes:
            run = {name: simulate(forwards, layers, h.num_experts, h.top_k,
                                  SimConfig(name, cache, batch_size, transfer_ratio, count_prefill,
                                            policy_settings=knobs[name]))
                   for name in dict.fromkeys(["belady", *policies])}
            floor = run["belady"].counters.loads
            for name in policies:
                run[name].loads_vs_belady = run[name].counters.loads / floor if floor else 1.0
                results.append(run[name])
    return results
