"""A causal LM's perplexity on real text, run through the offloaded engine: exp of the mean negative
log-likelihood over every scored token, so a budget, a policy or a dtype can be checked for what it costs in
quality (offloading itself costs nothing: the logits are transformers' own).

Windows as lm-eval's `loglikelihood_rolling` (HF's perplexity recipe with stride = window): the texts are
tokenized and joined into one stream, each text preceded by the eos token, and cut after `max_tokens` + 1
tokens; the stream is split into disjoint windows of `context` inputs, each scoring its inputs shifted by one.
Every token after the first is scored once, from 1 to `context` tokens of its own window before it.

Shape legend: S window positions, V vocabulary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from expertflow.api import ExpertflowModel
from expertflow.datasets import load_texts
from expertflow.engine.runner import DecoderRunner
from expertflow.errors import ExpertflowError

DEFAULT_DATASET = "xsum"  # held out: no model here was trained on its documents
DEFAULT_MAX_TOKENS = 8192  # ~1 s of forwards on the embedded model with 2 CPU cores (~6 s with the load)
MAX_DEFAULT_CONTEXT = 2048  # lm-eval's default length: keeps a long-context model's (S, V) logits in bounds


@dataclass(frozen=True)
class PerplexityConfig:
    """What to score: a named text set or a local file, how many tokens, in windows of how many (None: the
    model's context, at most MAX_DEFAULT_CONTEXT)."""

    dataset: str = DEFAULT_DATASET
    max_tokens: int = DEFAULT_MAX_TOKENS
    context: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ExpertflowError(f"--max-tokens must be at least 1 (the tokens to score), got {self.max_tokens}")
        if self.context is not None and self.context < 2:
            raise ExpertflowError(f"--context must be at least 2 tokens per window, got {self.context}")


@dataclass(frozen=True)
class Perplexity:
    tokens: int          # scored tokens
    nll: float           # mean negative log-likelihood per scored token, in nats
    windows: int
    context: int         # inputs per window (the last may be shorter)
    seconds: float
    expert_loads: int    # loads into the fast tier during the run
    hit_ratio: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, **asdict(self)}


def dataset_texts(dataset: str) -> list[str]:
    """The texts of a named set or a local file, refused if there are none (before any model loads)."""
    texts = [text for text in load_texts(dataset) if text.strip()]
    if not texts:
        raise ExpertflowError(f"{dataset} holds no text to score; give a file with some")
    return texts


def score_texts(model: ExpertflowModel, texts: Iterable[str], config: PerplexityConfig,
                progress: bool = False) -> Perplexity:
    """`model`'s perplexity on the first `config.max_tokens` tokens of `texts` (see the module docstring)."""
    check_causal(model)
    if model.tokenizer is None:
        raise ExpertflowError(f"{model.name} has no tokenizer files to turn text into tokens; score token ids with "
                              "expertflow.perplexity.perplexity(model, ids) instead")
    return perplexity(model, token_stream(model, texts, config.max_tokens), config.context, progress)


def token_stream(model: ExpertflowModel, texts: Iterable[str], max_tokens: int) -> list[int]:
    """The texts' tokens, each text after an eos, up to `max_tokens` + 1 tokens (the first is never scored)."""
    eos = model.tokenizer.eos_token_id
    eos = eos if eos is not None else model.engine.parts.eos_token_ids[0]
    stream: list[int] = []
    for text in texts:
        if len(stream) > max_tokens:
            break
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            stream += [eos, *ids]
    return stream[: max_tokens + 1]


def check_causal(model: ExpertflowModel) -> None:
    if model.engine.parts.adapter.kind != "decoder":
        raise ExpertflowError(f"perplexity scores causal LMs; {model.name} is {model.engine.parts.adapter.kind}, "
                              "whose decoder reads an encoder's input")


def window_context(model: ExpertflowModel, context: int | None) -> int:
    """The window: `context` as given, checked against the model's positions, or the default."""
    limit = model.engine.max_positions
    if context is None:
        return min(limit or MAX_DEFAULT_CONTEXT, MAX_DEFAULT_CONTEXT)
    if context < 2:
        raise ExpertflowError(f"--context must be at least 2 tokens per window, got {context}")
    if limit is not None and context > limit:
        raise ExpertflowError(f"--context {context} is above {model.name}'s context of {limit} positions; "
                              f"pass at most {limit}")
    return context


def windows(length: int, context: int) -> list[tuple[int, int]]:
    """(start, end) of each window's inputs stream[start:end]; its targets are stream[start + 1:end + 1]."""
    return [(start, min(start + context, length - 1)) for start in range(0, length - 1, context)]


def perplexity(model: ExpertflowModel, stream: list[int], context: int | None = None,
               progress: bool = False) -> Perplexity:
    """Perplexity over stream[1:], one forward per window through the offloaded model (its cache and budget)."""
    check_causal(model)
    if len(stream) < 2:
        raise ExpertflowError(f"too little text to score: {len(stream)} token(s), and scoring needs at least 2")
    context = window_context(model, context)
    spans = windows(len(stream), context)
    before = model.cache.figures().counters
    start = time.perf_counter()
    total = 0.0  # float64: the sum of the float32 log-likelihoods
    for index, (a, b) in enumerate(tqdm(spans, desc="perplexity", unit="window", disable=None if progress else True)):
        total += window_nll(model.engine, stream[a:b], stream[a + 1:b + 1], index)
    seconds = time.perf_counter() - start
    after = model.cache.figures().counters
    hits, misses = after.hits - before.hits, after.correction_loads - before.correction_loads
    tokens = len(stream) - 1
    return Perplexity(tokens=tokens, nll=total / tokens, windows=len(spans), context=context, seconds=seconds,
                      expert_loads=after.loads - before.loads,
                      hit_ratio=hits / (hits + misses) if hits + misses else 1.0)


@torch.inference_mode()
def window_nll(engine: DecoderRunner, inputs: list[int], targets: list[int], index: int = 0) -> float:
    """The summed negative log-likelihood of `targets` after each prefix of `inputs`: one forward, no KV cache.
    The cache plans from the predictor's forecast for the window first, as for a prefill."""
    engine.parts.cache.begin_step(engine.forecast([inputs], True))
    logits = engine.model(input_ids=torch.tensor([inputs], device=engine.device), use_cache=False).logits[0]
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)                        # (S, V)
    picked = logp.gather(-1, torch.tensor(targets, device=logp.device)[:, None])[:, 0]  # (S,)
    if not torch.isfinite(picked).all():
        raise ExpertflowError(f"window {index}'s log-likelihoods are not finite (NaN or Inf logits); check the "
                              "checkpoint's weights, or run in a wider --dtype")
    return -picked.to(torch.float64).sum().item()
