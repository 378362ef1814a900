"""Sampling a step's tokens, and the checks a request and a step's logits pass first.

Shape legend: B rows, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from expertflow.errors import ExpertflowError


def check_temperature(temperature: float) -> None:
    """The one rule for a sampling temperature, whichever front end it came through (CLI, API, traces)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ExpertflowError(f"--temperature must be a finite number >= 0, got {temperature}")


class Sampler:
    """Greedy at temperature 0, otherwise softmax sampling from a seeded generator."""

    def __init__(self, temperature: float, seed: int | None) -> None:
        check_temperature(temperature)
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed if seed is not None else 0)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B,)
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / self.temperature, dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1).to(logits.device)


# Row b of a forward whose logits went non-finite -> the MoE layer whose experts' output first did, or None.
NonFiniteLocator = Callable[[int], int | None]


def check_logits(logits: torch.Tensor, steps: list[int], locate: NonFiniteLocator | None = None,
                 done: torch.Tensor | None = None) -> None:
    """Stop on NaN/Inf logits (B, V) before they are sampled (their argmax is token 0, silently).

    `steps[b]`: the tokens row b has generated (0: these logits are its prefill's); rows set in `done` (B,)
    are not sampled, so not checked. One reduction and one sync per forward; `locate` runs only on failure."""
    finite = torch.isfinite(logits).all(dim=-1)  # (B,)
    if done is not None:
        finite |= done
    if bool(finite.all()):
        return
    row = int((~finite).nonzero()[0])
    where = "prefill" if steps[row] == 0 else f"decode step {steps[row]}"
    layer = locate(row) if locate is not None else None
    first = f" (first in the experts' output of MoE layer {layer})" if layer is not None else ""
    raise ExpertflowError(f"the model's logits are NaN/Inf at {where}{first}; its weights are corrupt or "
                          "overflow the dtype: check or re-download the checkpoint, or pass --dtype float32")


def check_request(input_ids: list[list[int]], max_new_tokens: int, max_positions: int | None) -> None:
    """One-line errors for requests no engine can run: an empty prompt, no new tokens, past the context."""
    if not input_ids or any(len(p) == 0 for p in input_ids):
        raise ExpertflowError("empty prompt: give at least one token of input")
    if max_new_tokens < 1:
        raise ExpertflowError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    longest = max(map(len, input_ids))
    if max_positions and longest + max_new_tokens > max_positions:
        raise ExpertflowError(
            f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's context of "
            f"{max_positions}; shorten the prompt or lower max_new_tokens"
        )
