"""The Routing Path Predictor network: a small T5-style encoder-decoder with one head per MoE layer.

Shape legend: B sequences, S positions (Sq queries, Sk keys: cached positions first), D d_model, F d_ff,
H attention heads, Dh = D/H head size, L MoE layers, E experts.
Input (B, S) token ids -> (B, S, L, E) logits. Every attention is causal over a fixed window and positions are
relative, so the prediction for t depends only on the last `receptive_field` tokens; `decode` is the one path
through the layers, with or without cached keys/values. Design: docs/design/predictor.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from expertflow.errors import ExpertflowError
from expertflow.outputs import write_dir

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values (B, H, Sk, Dh)


@dataclass
class LayerKV:
    """Every attention's keys/values, one (keys, values) per layer."""
    encoder: list[KV]        # per encoder layer, self-attention
    decoder_self: list[KV]   # per decoder layer, self-attention
    decoder_cross: list[KV]  # per decoder layer, its projections of the encoder output (cross-attention)


class AttentionBiases(NamedTuple):
    """Additive attention masks, broadcastable to (B, H, Sq, Sk): -inf where a key is outside the window."""
    encoder: torch.Tensor    # relative position bias of the encoder's self-attention
    decoder: torch.Tensor    # relative position bias of the decoder's self-attention
    cross: torch.Tensor      # 0 / -inf only: cross-attention has no position bias


@dataclass(frozen=True)
class PredictorConfig:
    vocab_size: int
    num_layers: int            # L: MoE layers of the model whose routing is predicted
    num_experts: int           # E
    top_k: int                 # K: experts the MoE model selects per token and layer
    d_model: int = 128
    d_ff: int = 512
    num_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    window: int = 64           # attention span in positions, itself included
    relative_buckets: int = 32
    head_hidden: int = 0       # 0: one linear head per layer; N: a per-layer MLP head with N hidden units
    dropout: float = 0.1
    model_name: str = ""       # the MoE model the traces came from

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_layers", "num_experts", "d_model", "d_ff", "num_heads", "window",
                     "relative_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_hidden < 0:
            raise ValueError(f"head_hidden must be >= 0 (0 = linear heads), got {self.head_hidden}")
        if self.encoder_layers < 1 or self.decoder_layers < 1:
            raise ValueError("encoder_layers and decoder_layers must be >= 1")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..{self.num_experts}, got {self.top_k}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def receptive_field(self) -> int:
        """Tokens back (itself included) that can influence one position's prediction."""
        return (self.encoder_layers + self.decoder_layers) * (self.window - 1) + 1


def relative_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's unidirectional bucketing of distance n = query - key >= 0: exact below num_buckets/2, log above."""
    n = relative.clamp(min=0)
    exact = num_buckets // 2
    log_part = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max(max_distance, exact + 1) / exact)
                        * (num_buckets - exact)).long()
    return torch.where(n < exact, n, log_part.clamp(max=num_buckets - 1))


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: PredictorConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
        self.o = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, D) -> keys, values (B, H, S, D/H)."""
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return k, v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # x (B, Sq, D) queries; k, v (B, H, Sk, D/H); bias broadcastable to (B, H, Sq, Sk), -inf outside the window
        B, Sq, D = x.shape
        q = self.q(x).view(B, Sq, self.heads, -1).transpose(1, 2)             # (B, H, Sq, D/H)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(B, Sq, D))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor,
                past: KV | None = None) -> tuple[torch.Tensor, KV]:
        """Queries x (B, Sq, D) over the `past` keys/values (B, H, P, Dh) and memory's (B, S, D) -> (B, Sq, D)
        and the keys/values attended to (B, H, P + S, Dh)."""
        kv = _extend(past, self.project_kv(memory))
        return self.attend(x, *kv, bias), kv


def _extend(past: KV | None, new: KV) -> KV:
    """Cached (B, H, P, Dh) + new (B, H, S, Dh) -> (B, H, P + S, Dh)."""
    if past is None:
        return new
    return torch.cat([past[0], new[0]], dim=2), torch.cat([past[1], new[1]], dim=2)


class GatedFeedForward(nn.Module):
    """T5 v1.1's gated-GELU feed-forward."""

    def __init__(self, cfg: PredictorConfig) -> None:
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.wi(x).chunk(2, dim=-1)
        return self.wo(self.drop(F.gelu(gate, approximate="tanh") * up))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: PredictorConfig) -> None:
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.norm2, self.ff = RMSNorm(cfg.d_model), GatedFeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, self_bias: torch.Tensor, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        h = self.norm1(x)
        attended, kv = self.attn(h, h, self_bias, past)
        x = x + self.drop(attended)
        return x + self.drop(self.ff(self.norm2(x))), kv


class DecoderBlock(nn.Module):
    def __init__(self, cfg: PredictorConfig) -> None:
        super().__init__()
        self.norm1, self.self_attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.norm2, self.cross_attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.norm3, self.ff = RMSNorm(cfg.d_model), GatedFeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, y: torch.Tensor, memory: torch.Tensor, self_bias: torch.Tensor, cross_mask: torch.Tensor,
                past_self: KV | None = None, past_cross: KV | None = None) -> tuple[torch.Tensor, KV, KV]:
        h = self.norm1(y)
        attended, self_kv = self.self_attn(h, h, self_bias, past_self)
        y = y + self.drop(attended)
        attended, cross_kv = self.cross_attn(self.norm2(y), memory, cross_mask, past_cross)
        y = y + self.drop(attended)
        return y + self.drop(self.ff(self.norm3(y))), self_kv, cross_kv


class RoutingHeads(nn.Module):
    """The L per-layer heads, (..., D) -> (..., L, E) logits.

    Linear heads read every layer's routing off one D-wide state, which bounds the L*E logits to rank D;
    MLP heads (head_hidden > 0) give each MoE layer its own nonlinear read-out, as each MoE layer has its
    own router over its own hidden state. The first projection of all layers runs as one matmul."""

    def __init__(self, cfg: PredictorConfig) -> None:
        super().__init__()
        self.layers, self.experts, self.hidden = cfg.num_layers, cfg.num_experts, cfg.head_hidden
        # Start every expert at the base rate K/E, so early training does not fight a 50% prior.
        base_rate = math.log(cfg.top_k / (cfg.num_experts - cfg.top_k + 1e-9))
        if self.hidden == 0:
            self.proj = nn.Linear(cfg.d_model, cfg.num_layers * cfg.num_experts)
            nn.init.constant_(self.proj.bias, base_rate)
            return
        self.proj = nn.Linear(cfg.d_model, cfg.num_layers * self.hidden)
        self.out = nn.Parameter(torch.randn(cfg.num_layers, self.hidden, cfg.num_experts) / math.sqrt(self.hidden))
        self.out_bias = nn.Parameter(torch.full((cfg.num_layers, cfg.num_experts), base_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.hidden == 0:
            return self.proj(x).view(*lead, self.layers, self.experts)
        h = F.gelu(self.proj(x).view(-1, self.layers, self.hidden), approximate="tanh")   # (N, L, Hh)
        logits = torch.einsum("nlh,lhe->nle", h, self.out) + self.out_bias              # (N, L, E)
        return logits.view(*lead, self.layers, self.experts)


class RoutingPathModel(nn.Module):
    def __init__(self, cfg: PredictorConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)  # shared by encoder and decoder, as in T5
        self.enc_bias = nn.Embedding(cfg.relative_buckets, cfg.num_heads)
        self.dec_bias = nn.Embedding(cfg.relative_buckets, cfg.num_heads)
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.decoder_layers))
        self.enc_norm, self.dec_norm = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.heads = RoutingHeads(cfg)
        nn.init.normal_(self.embed.weight, std=1.0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) token ids -> (B, S, L, E) logits."""
        hidden, _ = self.decode(input_ids, self.window_biases(input_ids.shape[1], input_ids.device))
        return self.logits(hidden)

    def decode(self, input_ids: torch.Tensor, biases: AttentionBiases,
               past: LayerKV | None = None) -> tuple[torch.Tensor, LayerKV]:
        """(B, S) token ids, after `past`'s cached positions if given -> the decoder's output (B, S, D) and
        every attention's keys/values over the cached and new positions (B, H, P + S, Dh)."""
        encoder_past = past.encoder if past else [None] * len(self.encoder)
        self_past = past.decoder_self if past else [None] * len(self.decoder)
        cross_past = past.decoder_cross if past else [None] * len(self.decoder)
        x = self.drop(self.embed(input_ids))                                     # (B, S, D)
        memory, kv = x, LayerKV([], [], [])
        for block, cached in zip(self.encoder, encoder_past):
            memory, layer_kv = block(memory, biases.encoder, cached)
            kv.encoder.append(layer_kv)
        memory = self.enc_norm(memory)
        y = x
        for block, cached_self, cached_cross in zip(self.decoder, self_past, cross_past):
            y, self_kv, cross_kv = block(y, memory, biases.decoder, biases.cross, cached_self, cached_cross)
            kv.decoder_self.append(self_kv)
            kv.decoder_cross.append(cross_kv)
        return y, kv

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's output (..., D) -> (..., L, E) logits."""
        return self.heads(self.dec_norm(hidden))

    def window_biases(self, S: int, device: torch.device) -> AttentionBiases:
        """The biases of a forward over S positions from the first: each attends to the last `window`."""
        pos = torch.arange(S, device=device)
        distance = pos[:, None] - pos[None, :]                                   # (S, S) query - key
        return self.attention_biases(distance, ((distance >= 0) & (distance < self.config.window))[None])

    def attention_biases(self, distance: torch.Tensor, allowed: torch.Tensor) -> AttentionBiases:
        """distance (Sq, Sk) query - key positions, allowed (B or 1, Sq, Sk) bool -> (B or 1, H, Sq, Sk) biases."""
        buckets = relative_bucket(distance, self.config.relative_buckets, self.config.window)
        blocked = torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, float("-inf"))[:, None]
        return AttentionBiases(self.enc_bias(buckets).permute(2, 0, 1) + blocked,
                               self.dec_bias(buckets).permute(2, 0, 1) + blocked, blocked)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


def save_model(model: RoutingPathModel, directory: str | Path,
               write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write config.json + model.safetensors (+ whatever `write_extra(tmp_dir)` adds) to a temp dir, then
    put it in place (expertflow.outputs.write_dir): readers never see a half-written file, and other files
    already in `directory` stay."""
    def fill(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_NAME))
        if write_extra is not None:
            write_extra(tmp)

    return write_dir(directory, fill)


def _current_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Predictors saved before the heads became a module stored them as `heads.weight`/`heads.bias`."""
    return {(f"heads.proj.{k[len('heads.'):]}" if k in ("heads.weight", "heads.bias") else k): v
            for k, v in state.items()}


def load_model(directory: str | Path) -> RoutingPathModel:
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise ExpertflowError(f"{directory}: not a predictor directory (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
                              "create one with `expertflow train-predictor`")
    retrain = "retrain it with `expertflow train-predictor` (or copy the directory again)"
    try:
        fields = json.loads(config_path.read_bytes())
        if not isinstance(fields, dict):
            raise TypeError(f"a JSON {type(fields).__name__}, not an object")
        model = RoutingPathModel(PredictorConfig(**fields))
    except (ValueError, TypeError, RuntimeError, OSError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise ExpertflowError(f"{config_path} is not a predictor config ({_first_line(exc)}); {retrain}") from None
    try:
        state = _current_names(load_file(str(weights_path)))
    except (SafetensorError, OSError) as exc:
        raise ExpertflowError(f"{weights_path} is truncated or corrupt ({_first_line(exc)}); {retrain}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # its first line only names the model; the second names the first mismatch
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ExpertflowError(f"{weights_path} does not fit {config_path} ({lines[min(1, len(lines) - 1)]}); "
                              f"{retrain}") from None
    bad = next((name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())),
               None)
    if bad is not None:  # a predictor that diverged in training forecasts nothing: refuse it, not run it
        raise ExpertflowError(f"{directory}: predictor weight {bad} holds NaN/Inf; {retrain}")
    return model.eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
