"""What `Service` and the app need of whatever runs the model: one local `EngineLoop`, or engine replicas
behind a router (`expertflow.distributed.replicas`). The service only hands over sequences and awaits
outcomes through their listeners, so either can sit behind the same endpoints."""

from __future__ import annotations

from typing import Protocol

import torch

from expertflow.engine.steps import Sequence
from expertflow.server.loop import Listener


class EngineBackend(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    @property
    def alive(self) -> bool: ...

    @property
    def running(self) -> int:
        """Sequences handed over and not yet finished."""

    def next_index(self) -> int: ...

    def add(self, seq: Sequence, listener: Listener) -> None:
        """Run `seq`; its tokens and outcome go to `listener`. Called on the event loop."""

    async def score(self, ids: list[int]) -> torch.Tensor:
        """(S, V) next-token log-softmax after each prefix of `ids` (`scoring.token_logprobs`)."""

    async def cache_report(self) -> dict:
        """The `/metrics` cache figures (`metrics.cache_figures`), summed over replicas if there are several."""

    async def report(self) -> dict:
        """Extra fields for `/health` and `/metrics` (per-replica state); empty for one local engine."""
