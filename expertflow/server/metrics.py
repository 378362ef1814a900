"""Request counters and latencies for `/metrics`, beside the cache's own figures (`cache.figures()`),
which are read, not recomputed."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from expertflow.cache.expert_cache import CacheFigures


@dataclass
class ServerMetrics:
    window: int = 1024   # latencies kept for the percentiles
    started: float = field(default_factory=time.time)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("succeeded", "client_errors", "server_errors", "cancelled"), 0))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    recording: Callable[[], dict] | None = None   # the trace recorder's figures, when serve records
    _latency: deque = field(init=False)
    _first_token: deque = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"metrics window must be >= 1, got {self.window}")
        self._latency = deque(maxlen=self.window)
        self._first_token = deque(maxlen=self.window)

    def count(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1

    def count_status(self, status: int) -> None:
        """An error answered before any token: 4xx is the client's, 5xx the server's."""
        self.count("client_errors" if status < 500 else "server_errors")

    def finished(self, seconds: float, first_token_seconds: float | None, prompt: int, completion: int) -> None:
        with self._lock:
            self.counts["succeeded"] += 1
            self._latency.append(seconds)
            if first_token_seconds is not None:
                self._first_token.append(first_token_seconds)
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def snapshot(self, cache: dict, running: int) -> dict:
        """`cache`: the engine's figures as `cache_figures` formats them."""
        with self._lock:
            latency, first = list(self._latency), list(self._first_token)
            counts = dict(self.counts)
            tokens = {"prompt": self.prompt_tokens, "completion": self.completion_tokens}
        return {"uptime_seconds": time.time() - self.started,
                "requests": {**counts, "running": running},
                "tokens": tokens,
                "latency_seconds": _percentiles(latency),
                "time_to_first_token_seconds": _percentiles(first),
                "cache": cache,
                **({} if self.recording is None else {"recording": self.recording()})}


def cache_figures(figures: CacheFigures) -> dict:
    c = figures.counters
    return {"hit_ratio": c.hit_ratio, "hits": c.hits, "correction_loads": c.correction_loads,
            "misses": c.correction_loads,  # the old name, for scripts that read it
            "loads": c.loads, "prefetch_loads": c.prefetch_loads, "evictions": c.evictions,
            "bytes_moved": figures.bytes_moved, "capacity_experts": figures.capacity_experts,
            "fast_tier_bytes": figures.capacity_experts * figures.expert_bytes,
            "peak_fast_tier_bytes": figures.peak_expert_bytes, "all_expert_bytes": figures.all_expert_bytes,
            "transfer_wait_seconds": figures.wait_seconds}


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p95": None}
    return {"count": len(values), "mean": float(np.mean(values)), "p50": float(np.percentile(values, 50)),
            "p95": float(np.percentile(values, 95))}
