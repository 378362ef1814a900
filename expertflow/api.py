"""The Python API, shaped like transformers: `expertflow.from_pretrained(path, ...)`."""

from __future__ import annotations

from pathlib import Path

from expertflow.config import EngineConfig, parse_size
from expertflow.engine.steps import BatchRunner, ManyOutput, generate
from expertflow.engine.runner import DecoderRunner, GenerationOutput, Predictor
from expertflow.errors import ExpertflowError
from expertflow.loading import load
from expertflow.predictor.runtime import RoutingPredictor
from expertflow.engine.routing import RoutingRecorder
from expertflow.scheduler import scheduler_class
from expertflow.engine.seq2seq_runner import Seq2SeqRunner
from expertflow.stats import RunStats


# The decode loop for each adapter kind: decoder-only models, or an encoder run once then a decoder.
ENGINES = {"decoder": DecoderRunner, "encoder-decoder": Seq2SeqRunner}


def check_prompt(prompt: str) -> None:
    if not prompt or not prompt.strip():
        raise ExpertflowError("empty prompt: pass some text with --prompt")
    try:  # argv bytes that are not UTF-8 arrive as lone surrogates, which no tokenizer takes
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ExpertflowError(f"--prompt must be UTF-8 text: character {exc.start} is a byte that is not "
                              "(or a lone surrogate); pass the prompt as UTF-8") from None


class ExpertflowModel:
    """An offloaded MoE model: `.generate(...)`, `.stats` (the last run's figures), `.tokenizer`."""

    def __init__(self, config: EngineConfig, predictor: Predictor | None = None) -> None:
        self.config = config
        recorder = RoutingRecorder()
        self._parts = load(config, observer=recorder.observe)
        self.engine = ENGINES[self._parts.adapter.kind](self._parts, recorder, self._predictor(predictor))
        self.stats: RunStats | None = None

    def _predictor(self, given: Predictor | None) -> Predictor | None:
        """The RPP that policies plan from and schedulers group by: `given`, else the config's directory."""
        if given is None and self.config.predictor is None:
            if not self._parts.policy.uses_forecast:
                return None
            raise ExpertflowError(f"policy {self.config.policy!r} plans from a routing predictor; pass "
                                  "--predictor DIR (train one with expertflow train-predictor)")
        if given is not None:
            return given
        return RoutingPredictor.load(self.config.predictor, device=self.config.device,
                                     expect=(len(self._parts.layers), self._parts.adapter.num_experts))

    @property
    def tokenizer(self):
        return self._parts.tokenizer

    @property
    def model(self):
        """The underlying transformers model, with its MoE `experts` modules offloaded."""
        return self._parts.model

    @property
    def budget_note(self) -> str | None:
        """A note for the user when the byte budget holds more than every expert (capped, not refused)."""
        return self._parts.budget_note

    @property
    def cache(self):
        return self._parts.cache

    @property
    def name(self) -> str:
        return self._parts.name

    @property
    def num_moe_layers(self) -> int:
        return len(self._parts.layers)

    @property
    def num_experts(self) -> int:
        return self._parts.adapter.num_experts

    @property
    def top_k(self) -> int:
        return self._parts.adapter.top_k

    def encode(self, prompt: str) -> list[int]:
        check_prompt(prompt)
        if self.tokenizer is None:
            raise ExpertflowError(f"{self.config.model} has no tokenizer files; pass token ids (input_ids=...) instead")
        return list(self.tokenizer(prompt)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def close(self) -> None:
        """Stop the background transfer worker, if the policy has one."""
        self._parts.cache.close()

    def generate(self, prompt: str | list[str] | None = None, *, input_ids: list[list[int]] | None = None,
                 max_new_tokens: int = 32, temperature: float = 0.0, seed: int | None = None,
                 record_routing: bool = False) -> GenerationOutput:
        """Generate for a prompt, a list of prompts, or token ids (a list of lists); greedy by default."""
        if (prompt is None) == (input_ids is None):
            raise ExpertflowError("give either a prompt (text) or input_ids, not both or neither")
        if input_ids is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            input_ids = [self.encode(p) for p in prompts]
        out = generate(self.engine, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                       record_routing=record_routing)
        self.stats = out.stats
        return out

    def generate_many(self, prompts: list[str] | None = None, *, input_ids: list[list[int]] | None = None,
                      batch_size: int = 8, scheduler: str = "fifo", schedule_unit: int = 2,
                      max_new_tokens: int = 32, temperature: float = 0.0, seed: int | None = None,
                      pipeline: bool = True) -> ManyOutput:
        """Many prompts in scheduling units of `schedule_unit` batches of `batch_size`, regrouped each step by
        `scheduler` (fifo keeps arrival order); outputs come back in input order. With `pipeline`, two units
        are in flight and one is predicted and scheduled on a worker while the other runs."""
        if (prompts is None) == (input_ids is None):
            raise ExpertflowError("give either prompts (text) or input_ids, not both or neither")
        if self._parts.adapter.kind != "decoder":
            raise ExpertflowError(f"batched scheduling runs decoder-only models; {self.name} is "
                                  f"{self._parts.adapter.kind}: run its prompts with generate one at a time")
        if input_ids is None:
            input_ids = [self.encode(p) for p in prompts]
        if batch_size < 1 or schedule_unit < 1:
            raise ExpertflowError(f"--batch-size and --schedule-unit must be at least 1, got {batch_size} and "
                                  f"{schedule_unit}")
        runner = BatchRunner(self.engine, scheduler_class(scheduler)(), batch_size, schedule_unit, pipeline)
        out = runner.run(input_ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        self.stats = out.stats
        return out


def from_pretrained(path: str | Path | None = None, *, cache_experts: int | None = None,
                    cache_bytes: int | str | None = None, memory_budget: int | str | None = None,
                    policy: str | None = None, store: str | None = None, page_cache: bool = False,
                    device: str = "cpu", dtype: str = "auto", predictor: str | Path | Predictor | None = None,
                    transfer_ratio: float | None = None, experts_implementation: str = "auto",
                    policy_settings: dict[str, float] | None = None) -> ExpertflowModel:
    """Load an MoE checkpoint with offloaded experts. `path`: a directory, or a hub id ("owner/name[@revision]")
    found in the Hugging Face cache or downloaded into it; without one, the embedded tiny-mixtral-32e.

    The fast-tier budget is one of `cache_experts` (slots), `cache_bytes` (bytes of expert slots) or
    `memory_budget` (bytes of the whole fast tier: non-expert weights, then expert slots); sizes may be
    written like "2GiB".
    `experts_implementation`: whose arithmetic the offloaded experts reproduce bit for bit, "auto" (transformers'
    default for the model, grouped_mm) or "eager" / "grouped_mm" / "batched_mm".
    `store`: the slow tier, default disk on a CPU device and host RAM on CUDA; `page_cache`: let disk reads go
    through the OS page cache (default: bypass it). `dtype`: "auto" (the checkpoint's own) or a dtype name.
    `predictor`: a trained RPP directory, or an object with `predict`/`predict_next` (policy expertflow).
    `policy_settings`: the policy's knobs, e.g. {"threshold": 0.2} for expertflow (PLECConfig)."""
    if isinstance(cache_bytes, str):
        cache_bytes = parse_size(cache_bytes)
    if isinstance(memory_budget, str):
        memory_budget = parse_size(memory_budget)
    kwargs = {"model": Path(path)} if path is not None else {}
    given = predictor if predictor is not None and not isinstance(predictor, (str, Path)) else None
    config = EngineConfig(**kwargs, cache_experts=cache_experts, cache_bytes=cache_bytes,
                          memory_budget=memory_budget, policy=policy,
                          store=store, page_cache=page_cache, device=device, dtype=dtype,
                          transfer_ratio=transfer_ratio, experts_implementation=experts_implementation,
                          predictor=Path(predictor) if isinstance(predictor, (str, Path)) else None,
                          policy_settings=dict(policy_settings or {}))
    return ExpertflowModel(config, given)
