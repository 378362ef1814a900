"""The routing trace file: which experts every token of every sequence was routed to.

One safetensors file (format version 1): a JSON header under metadata["expertflow_trace"] and the tensors
prompt_lens, generated_lens, prompt_index, run (N sequences), token_ids (T tokens) and routing int16 (T, L, K),
the selected expert ids of every token at every MoE layer, NO_EXPERT (-1) where no expert computed it.
Written atomically (expertflow.outputs.atomic_path). Design: docs/design/traces.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from expertflow.errors import ExpertflowError
from expertflow.outputs import atomic_path

FORMAT_NAME = "expertflow-trace"
FORMAT_VERSION = 1
HEADER_KEY = "expertflow_trace"
_TENSORS = ("prompt_lens", "generated_lens", "prompt_index", "run", "token_ids", "routing")
NO_EXPERT = -1  # routing entry of a token that no expert of that layer computed


@dataclass(frozen=True)
class TraceHeader:
    model: str
    num_layers: int
    num_experts: int
    top_k: int
    dataset: str = ""
    runs: int = 1
    temperature: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 0
    vocab_size: int = 0        # the model's vocabulary (embedding rows); 0 if unknown

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.num_experts < 1:
            raise ValueError(f"num_layers and num_experts must be >= 1, got {self.num_layers}, {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..num_experts={self.num_experts}, got {self.top_k}")


@dataclass
class TraceSequence:
    """One prompt run: T = len(prompt_ids) + len(generated_ids) tokens, routing (T, L, K) int16."""

    prompt_ids: np.ndarray
    generated_ids: np.ndarray
    routing: np.ndarray
    prompt_index: int = 0
    run: int = 0

    def __post_init__(self) -> None:
        self.prompt_ids = np.asarray(self.prompt_ids, dtype=np.int32).reshape(-1)
        self.generated_ids = np.asarray(self.generated_ids, dtype=np.int32).reshape(-1)
        self.routing = np.asarray(self.routing, dtype=np.int16)
        if self.routing.ndim != 3 or self.routing.shape[0] != self.num_tokens:
            raise ValueError(f"routing must be (tokens={self.num_tokens}, L, K), got {self.routing.shape}")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.generated_ids)

    @property
    def token_ids(self) -> np.ndarray:
        return np.concatenate([self.prompt_ids, self.generated_ids])


@dataclass
class TraceSet:
    header: TraceHeader
    sequences: list[TraceSequence] = field(default_factory=list)

    def __post_init__(self) -> None:
        h = self.header
        for i, seq in enumerate(self.sequences):
            if seq.routing.shape[1:] != (h.num_layers, h.top_k):
                raise ValueError(f"sequence {i}: routing {seq.routing.shape} does not match "
                                 f"L={h.num_layers}, K={h.top_k}")
            if seq.routing.size and (seq.routing.min() < NO_EXPERT or seq.routing.max() >= h.num_experts):
                raise ValueError(f"sequence {i}: expert ids outside 0..{h.num_experts - 1} (or {NO_EXPERT}: none)")

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sequences)

    def write(self, path: str | Path) -> Path:
        return write_traces(self, path)

    @classmethod
    def read(cls, path: str | Path) -> "TraceSet":
        return read_traces(path)


def write_traces(traces: TraceSet, path: str | Path) -> Path:
    path = Path(path)
    seqs = traces.sequences
    h = traces.header
    tensors = {
        "prompt_lens": np.array([len(s.prompt_ids) for s in seqs], dtype=np.int64),
        "generated_lens": np.array([len(s.generated_ids) for s in seqs], dtype=np.int64),
        "prompt_index": np.array([s.prompt_index for s in seqs], dtype=np.int64),
        "run": np.array([s.run for s in seqs], dtype=np.int64),
        "token_ids": np.concatenate([s.token_ids for s in seqs] or [np.zeros(0, np.int32)]).astype(np.int32),
        "routing": np.concatenate([s.routing for s in seqs] or [np.zeros((0, h.num_layers, h.top_k), np.int16)]),
    }
    header = dict(format=FORMAT_NAME, version=FORMAT_VERSION, **asdict(h))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header)})
    return path


def read_traces(path: str | Path) -> TraceSet:
    path = Path(path)
    if not path.is_file():
        raise ExpertflowError(f"trace file not found: {path}")
    try:
        tensors = load_file(path)
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExpertflowError(f"{path}: not a readable trace file ({_first_line(exc)})") from None
    header = _parse_header(path, metadata)
    return _assemble(path, header, tensors)


def _parse_header(path: Path, metadata: dict[str, str]) -> TraceHeader:
    try:
        raw = json.loads(metadata[HEADER_KEY])
    except (KeyError, json.JSONDecodeError):
        raise ExpertflowError(f"{path}: safetensors file without an expertflow trace header") from None
    if not isinstance(raw, dict):
        raise ExpertflowError(f"{path}: bad trace header (a JSON {type(raw).__name__}, not an object); "
                              "trace again with `expertflow trace`")
    if raw.pop("format", None) != FORMAT_NAME or raw.pop("version", None) != FORMAT_VERSION:
        raise ExpertflowError(f"{path}: unsupported trace format (expected {FORMAT_NAME} v{FORMAT_VERSION})")
    try:
        return TraceHeader(**raw)
    except (TypeError, ValueError) as exc:
        raise ExpertflowError(f"{path}: bad trace header ({_first_line(exc)})") from None


def _assemble(path: Path, header: TraceHeader, tensors: dict[str, np.ndarray]) -> TraceSet:
    missing = [name for name in _TENSORS if name not in tensors]
    if missing:
        raise ExpertflowError(f"{path}: trace file lacks tensors {', '.join(missing)}")
    problem = _layout_problem(tensors)
    if problem is not None:
        raise ExpertflowError(f"{path}: inconsistent trace file ({problem}); trace again with `expertflow trace`")
    p_lens, g_lens = tensors["prompt_lens"], tensors["generated_lens"]
    ids, routing = tensors["token_ids"], tensors["routing"]
    sequences, start = [], 0
    for i, (p, g) in enumerate(zip(p_lens.tolist(), g_lens.tolist())):
        mid, end = start + p, start + p + g
        sequences.append(TraceSequence(ids[start:mid], ids[mid:end], routing[start:end],
                                       int(tensors["prompt_index"][i]), int(tensors["run"][i])))
        start = end
    try:
        return TraceSet(header, sequences)
    except ValueError as exc:
        raise ExpertflowError(f"{path}: {exc}") from None


def _layout_problem(tensors: dict[str, np.ndarray]) -> str | None:
    """What keeps the tensors from being the format's layout (see the module docstring), or None."""
    per_sequence = [tensors[name] for name in ("prompt_lens", "generated_lens", "prompt_index", "run")]
    if any(t.ndim != 1 or t.dtype.kind not in "iu" for t in per_sequence) or len({len(t) for t in per_sequence}) != 1:
        return "prompt_lens, generated_lens, prompt_index and run must be integer vectors of one length"
    ids, routing = tensors["token_ids"], tensors["routing"]
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or routing.ndim != 3 or routing.dtype.kind not in "iu":
        return f"token_ids {ids.dtype}{list(ids.shape)} and routing {routing.dtype}{list(routing.shape)} must be " \
               "integer (T,) and (T, L, K)"
    p_lens, g_lens = tensors["prompt_lens"], tensors["generated_lens"]
    if (p_lens < 0).any() or (g_lens < 0).any() or (ids < 0).any():
        return "negative lengths or token ids"
    total = int(p_lens.sum() + g_lens.sum())
    if len(ids) != total or len(routing) != total:
        return f"lengths sum to {total} tokens, token_ids has {len(ids)}, routing has {len(routing)}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class TraceSummary:
    """What `trace-info` prints; per-layer lists have one entry per MoE layer."""

    sequences: int
    prompts: int
    prompt_tokens: int
    generated_tokens: int
    top_share: list[float]          # share of the layer's assignments taken by its most used expert
    gini: list[float]               # Gini coefficient of expert usage (0 = uniform, ->1 = one expert)
    entropy: list[float]            # usage entropy / log(E) (1 = uniform)
    prev_token_overlap: list[float]  # share of a token's experts that the previous token also used


def summarize(traces: TraceSet) -> TraceSummary:
    h = traces.header
    counts = np.zeros((h.num_layers, h.num_experts), dtype=np.int64)  # (L, E)
    overlap = np.zeros(h.num_layers)
    pairs = np.zeros(h.num_layers)
    for seq in traces.sequences:
        r = seq.routing.astype(np.int64)                                # (T, L, K)
        valid = r != NO_EXPERT
        layer = np.broadcast_to(np.arange(h.num_layers)[None, :, None], r.shape)
        np.add.at(counts, (layer[valid], r[valid]), 1)
        if len(r) > 1:
            same = ((r[1:, :, :, None] == r[:-1, :, None, :]) & valid[:-1, :, None, :]).any(-1)  # (T-1, L, K)
            both = valid[1:].any(-1) & valid[:-1].any(-1)               # (T-1, L): both tokens passed the layer
            overlap += (same.mean(-1) * both).sum(0)
            pairs += both.sum(0)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)        # (L, E)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(share > 0, share * np.log(share), 0.0).sum(1) / np.log(max(h.num_experts, 2))
    return TraceSummary(
        sequences=len(traces.sequences),
        prompts=len({s.prompt_index for s in traces.sequences}),
        prompt_tokens=sum(len(s.prompt_ids) for s in traces.sequences),
        generated_tokens=sum(len(s.generated_ids) for s in traces.sequences),
        top_share=share.max(1).tolist(),
        gini=[_gini(row) for row in share],
        entropy=entropy.tolist(),
        prev_token_overlap=(overlap / np.maximum(pairs, 1)).tolist(),
    )


def _gini(values: np.ndarray) -> float:
    v = np.sort(values)
    n, total = len(v), v.sum()
    if total <= 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ v / (n * total))
