"""Collect routing traces: run a model over a prompt set and record every token's selected experts.

The model is anything with the engine's `generate(..., record_routing=True)` API (see expertflow.api):
`tokenizer`, `num_moe_layers`, `num_experts`, `top_k`, `name`, and `generate` returning `sequences`
(generated ids per input) and `routing` ((prompt_len + generated, L, K) int16 per input), so the recorded
routing is the routing the engine executed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from expertflow.engine.sampling import check_temperature
from expertflow.traces import TraceHeader, TraceSequence, TraceSet


class TraceableModel(Protocol):
    """A model traces can be collected from: `ExpertflowModel`, or anything with its generate(record_routing=True)."""

    tokenizer: Any
    num_moe_layers: int
    num_experts: int
    top_k: int
    name: str

    def generate(self, input_ids: list[list[int]], max_new_tokens: int, temperature: float,
                 seed: int | None, record_routing: bool) -> Any: ...


@dataclass(frozen=True)
class TracingConfig:
    dataset: str
    runs: int = 1
    max_new_tokens: int = 32
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 8
    max_prompt_tokens: int = 256

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        if self.runs < 1:
            raise ValueError(f"runs must be >= 1, got {self.runs}")
        if self.runs > 1 and self.temperature <= 0:
            raise ValueError("runs > 1 needs temperature > 0: greedy runs of one prompt are identical")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_prompt_tokens < 2:
            raise ValueError(f"max_prompt_tokens must be >= 2, got {self.max_prompt_tokens}")


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids per prompt; an over-long prompt keeps its head and its last 16 tokens (the template's
    closing cue, e.g. "Summary:"), so long documents still end the way the template ends."""
    tail = min(16, max_tokens // 2)
    out = []
    for prompt in prompts:
        ids = list(tokenizer(prompt)["input_ids"])
        if len(ids) > max_tokens:
            ids = ids[: max_tokens - tail] + ids[-tail:]
        out.append(ids)
    return out


def collect_traces(model: TraceableModel, prompt_ids: Sequence[list[int]], config: TracingConfig,
                   on_batch: Callable[[int], None] | None = None, first_index: int = 0) -> TraceSet:
    """R runs of every prompt (token ids, see `encode_prompts`), batched; `on_batch(n)` is called after
    each batch of n sequences. `first_index` is the dataset index of the first prompt, recorded in
    each sequence's `prompt_index`."""
    sequences: list[TraceSequence] = []
    for run, start in trace_batches(len(prompt_ids), config):
        batch = prompt_ids[start : start + config.batch_size]
        sequences += trace_batch(model, batch, run, start, config, first_index)
        if on_batch is not None:
            on_batch(len(batch))
    return TraceSet(trace_header(model, config), sequences)


def trace_batches(num_prompts: int, config: TracingConfig) -> list[tuple[int, int]]:
    """(run, start) of every batch, in file order: the unit of work, so any split of it (e.g. across Ray
    workers) generates each batch exactly as a single process would."""
    return [(run, start) for run in range(config.runs) for start in range(0, num_prompts, config.batch_size)]


def trace_batch(model: TraceableModel, batch: Sequence[list[int]], run: int, start: int,
                config: TracingConfig, first_index: int = 0) -> list[TraceSequence]:
    """One batch of prompts `start..start+len(batch)-1` of run `run`."""
    # A distinct seed per (run, batch) so sampled runs differ but the whole set is reproducible.
    seed = config.seed + 1_000_003 * run + start
    out = model.generate(input_ids=list(batch), max_new_tokens=config.max_new_tokens,
                         temperature=config.temperature, seed=seed, record_routing=True)
    return [TraceSequence(np.array(ids), np.array(generated), np.asarray(routing),
                          prompt_index=first_index + start + offset, run=run)
            for offset, (ids, generated, routing) in enumerate(zip(batch, out.sequences, out.routing))]


def trace_header(model: TraceableModel, config: TracingConfig) -> TraceHeader:
    return TraceHeader(model=model.name, num_layers=model.num_moe_layers, num_experts=model.num_experts,
                       top_k=model.top_k, dataset=config.dataset, runs=config.runs,
                       temperature=config.temperature, seed=config.seed,
                       max_new_tokens=config.max_new_tokens, vocab_size=_vocab_size(model))


def _vocab_size(model: TraceableModel) -> int:
    # The embedding's row count, not len(tokenizer): checkpoints often pad the vocabulary.
    hf_config = getattr(getattr(model, "model", None), "config", None)
    return int(getattr(hf_config, "vocab_size", 0) or len(model.tokenizer))
