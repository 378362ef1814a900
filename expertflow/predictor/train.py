"""Train the Routing Path Predictor on routing traces: BCE over each token's (L, E) routing matrix (Eq. 1).

Shape legend: B sequences per step, S positions (right-padded), L layers, E experts.

Every token of a trace (prompt and generated) is a training example, at the layers it was routed at: a
layer whose entries are all NO_EXPERT (-1: the other stack of an encoder-decoder model, or a token the
router dropped for capacity) is left out of the loss and the recall, not taught as "no expert"; the
predictor cannot tell a prompt token from a generated one, so for Switch the same network learns encoder
layers from prompt rows and decoder layers from generated rows. The train/validation split is by
prompt (all runs of a prompt land on the same side), so validation measures unseen prompts rather than
resampled continuations of training prompts. The best validation-loss weights are kept; training stops
after `patience` epochs without improvement.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from expertflow.predictor.distill import RouterTeacher
from expertflow.predictor.metrics import routing_mask
from expertflow.predictor.model import PredictorConfig, RoutingPathModel
from expertflow.traces import NO_EXPERT, TraceSequence, TraceSet


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 16          # sequences per step
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    val_fraction: float = 0.1
    patience: int = 3
    seed: int = 0
    max_length: int = 512         # longer sequences are cut into pieces of this length
    freeze_embeddings: bool = False  # keep initial (MoE) embeddings fixed: unseen tokens stay consistent
    distill_weight: float = 1.0   # weight of the KL term to the MoE model's router softmax (with a teacher)
    distill_temperature: float = 1.0
    listwise_weight: float = 0.0  # weight of a softmax cross-entropy over each layer's experts (see _loss)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ValueError(f"epochs, batch_size must be >= 1 and max_length >= 2, got "
                             f"{self.epochs}, {self.batch_size}, {self.max_length}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0, weight_decay and warmup_steps >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.listwise_weight < 0:
            raise ValueError(f"listwise_weight must be >= 0, got {self.listwise_weight}")
        if self.distill_weight < 0 or self.distill_temperature <= 0:
            raise ValueError(f"distill_weight must be >= 0 and distill_temperature > 0, got "
                             f"{self.distill_weight}, {self.distill_temperature}")


@dataclass
class TrainResult:
    model: RoutingPathModel
    seconds: float
    epochs_run: int
    best_epoch: int
    history: list[dict] = field(default_factory=list)   # per epoch: train_loss, val_loss, val_recall
    train_sequences: int = 0
    val_sequences: int = 0
    train_tokens: int = 0


def split_by_prompt(traces: Sequence[TraceSet], val_fraction: float, seed: int
                    ) -> tuple[list[TraceSequence], list[TraceSequence]]:
    keys = sorted({(t.header.dataset, s.prompt_index) for t in traces for s in t.sequences})
    rng = np.random.default_rng(seed)
    n_val = int(round(len(keys) * val_fraction))
    val_keys = {keys[i] for i in rng.permutation(len(keys))[:n_val]}
    train, val = [], []
    for t in traces:
        for s in t.sequences:
            (val if (t.header.dataset, s.prompt_index) in val_keys else train).append(s)
    return train, val


# A training piece: token ids (S,), routing ids (S, L, K), and the teacher's float16 router logits (S, L, E)
# when distilling (None otherwise).
Piece = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def _pieces(seqs: Sequence[TraceSequence], max_length: int,
            logits: Sequence[np.ndarray] | None = None) -> list[Piece]:
    out = []
    for n, s in enumerate(seqs):
        ids = s.token_ids
        for start in range(0, len(ids), max_length):
            cut = slice(start, start + max_length)
            out.append((ids[cut], s.routing[cut], None if logits is None else logits[n][cut]))
    return out


def _collate(pieces: Sequence[Piece], num_experts: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> ids (B, S) long, targets (B, S, L, E) float, valid (B, S, L) bool: real positions at the layers
    they were routed at, and the teacher's logits (B, S, L, E) float or None."""
    S = max(len(ids) for ids, _, _ in pieces)
    L = pieces[0][1].shape[1]
    ids = torch.zeros(len(pieces), S, dtype=torch.long)
    targets = torch.zeros(len(pieces), S, L, num_experts)
    valid = torch.zeros(len(pieces), S, L, dtype=torch.bool)
    soft = torch.zeros(len(pieces), S, L, num_experts) if pieces[0][2] is not None else None
    for i, (tok, routing, logits) in enumerate(pieces):
        ids[i, : len(tok)] = torch.from_numpy(tok.astype(np.int64))
        targets[i, : len(tok)] = torch.from_numpy(routing_mask(routing, num_experts))
        valid[i, : len(tok)] = torch.from_numpy((routing != NO_EXPERT).any(axis=-1))
        if soft is not None:
            soft[i, : len(tok)] = torch.from_numpy(logits.astype(np.float32))
    return ids, targets, valid, soft


def _batches(pieces: list, batch_size: int, rng: np.random.Generator | None) -> list[list]:
    """Length-sorted batches (little padding); batch order shuffled when rng is given."""
    order = sorted(range(len(pieces)), key=lambda i: len(pieces[i][0]))
    groups = [[pieces[i] for i in order[g : g + batch_size]] for g in range(0, len(order), batch_size)]
    if rng is not None:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    return groups


def _standardised(logits: torch.Tensor) -> torch.Tensor:
    """(..., E) -> zero mean, unit deviation over the experts."""
    return (logits - logits.mean(-1, keepdim=True)) / logits.std(-1, keepdim=True).clamp(min=1e-6)


def _loss(model: RoutingPathModel, batch: list, num_experts: int, config: TrainConfig
          ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """-> (training loss, summed top-k hits, scored (position, layer) count, the BCE part alone)."""
    ids, targets, valid, soft = _collate(batch, num_experts)
    logits = model(ids)                                                         # (B, S, L, E)
    per_layer = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)  # (B, S, L)
    count = valid.sum().clamp(min=1)
    bce = (per_layer * valid).sum() / count
    loss = bce
    if soft is not None and config.distill_weight > 0:
        # KL(teacher || predictor) over each (position, layer)'s experts, on logits standardised over the
        # experts: the BCE sets the predictor's logit scale (its calibration), which need not be the router's,
        # so only the shape of the profile is matched. Per expert like the BCE term so the weight compares
        # the two; T^2 keeps the gradient's scale independent of the temperature.
        t = config.distill_temperature
        kl = F.kl_div(F.log_softmax(_standardised(logits) / t, -1), F.log_softmax(_standardised(soft) / t, -1),
                      log_target=True, reduction="none").sum(-1) * (t * t / num_experts)   # (B, S, L)
        loss = bce + config.distill_weight * (kl * valid).sum() / count
    k = model.config.top_k
    if config.listwise_weight > 0:
        # The evaluation and the cache read each token's top-k: a softmax over the layer's experts with the
        # routed set as its target ranks them against each other, which the per-expert BCE does only
        # indirectly. Shift-invariant but not scale-invariant: at weight 1 it sharpened the logits away from the
        # BCE's calibration and lowered validation recall (docs/results/predictor.md).
        listwise = -(targets * F.log_softmax(logits, -1)).sum(-1) / k                 # (B, S, L)
        loss = loss + config.listwise_weight * (listwise * valid).sum() / count
    top = logits.topk(k, dim=-1).indices                                        # (B, S, L, K)
    hits = targets.gather(-1, top).sum(-1) / k                                  # (B, S, L) top-k recall
    return loss, (hits * valid).sum(), int(valid.sum()), bce


def train_predictor(traces: Sequence[TraceSet], model_config: PredictorConfig, config: TrainConfig,
                    progress: bool = True, embeddings: torch.Tensor | None = None,
                    start: RoutingPathModel | None = None, teacher: RouterTeacher | None = None) -> TrainResult:
    """`embeddings` (V, H): the MoE model's input embeddings to start the predictor's from (see
    `initial_embeddings`); tokens rare in the traces then start where the MoE model puts them.
    `start`: a trained predictor of the same architecture to go on from (more traces, another session).
    `teacher`: the traced MoE model; its router logits add a distillation term (distill.py)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train_seqs, val_seqs = split_by_prompt(traces, config.val_fraction, config.seed)
    distilling = teacher is not None and config.distill_weight > 0

    soft = teacher.logits_of([q.token_ids for q in train_seqs], progress) if distilling else None
    train_pieces = _pieces(train_seqs, config.max_length, soft)
    # Validation scores the BCE alone (see _validate), so the teacher never runs over it.
    val_batches = _batches(_pieces(val_seqs, config.max_length), config.batch_size, None)
    model = RoutingPathModel(model_config)
    if start is not None:
        model.load_state_dict(start.state_dict())
    if embeddings is not None:
        with torch.no_grad():
            model.embed.weight.copy_(initial_embeddings(embeddings, model_config.d_model))
    # Frozen MoE embeddings make the predictor a function of the MoE model's own token geometry, so tokens
    # that never occur in the traces (other domains) are placed where the trained ones taught it to look.
    model.embed.weight.requires_grad_(not (config.freeze_embeddings and embeddings is not None))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_pieces) / config.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(config, steps_per_epoch * config.epochs))
    E = model_config.num_experts
    result = TrainResult(model, 0.0, 0, 0, train_sequences=len(train_seqs), val_sequences=len(val_seqs),
                         train_tokens=sum(len(piece[0]) for piece in train_pieces))
    best, best_state, start = math.inf, None, time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        total = 0.0
        bar = tqdm(_batches(train_pieces, config.batch_size, rng), desc=f"epoch {epoch + 1}/{config.epochs}",
                   unit="batch", disable=not progress, leave=False)
        for batch in bar:
            loss, _, _, _ = _loss(model, batch, E, config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            total += loss.item()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        record = {"epoch": epoch + 1, "train_loss": total / max(steps_per_epoch, 1),
                  **_validate(model, val_batches, E, config)}
        result.history.append(record)
        if progress:
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        score = record.get("val_loss", record["train_loss"])
        if score < best:
            best, result.best_epoch = score, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch + 1 - result.best_epoch >= config.patience:
            break
    result.epochs_run = len(result.history)
    result.seconds = time.perf_counter() - start
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


@torch.inference_mode()
def _validate(model: RoutingPathModel, val_batches: list, num_experts: int, config: TrainConfig) -> dict:
    """val_loss is the BCE alone, so runs with and without distillation select and compare alike."""
    if not val_batches:
        return {}
    model.eval()
    loss_sum, hit_sum, count = 0.0, 0.0, 0
    for batch in val_batches:
        _, hits, n, bce = _loss(model, batch, num_experts, config)
        loss_sum, hit_sum, count = loss_sum + bce.item() * n, hit_sum + hits.item(), count + n
    return {"val_loss": loss_sum / count, "val_recall": hit_sum / count}


def _schedule(config: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(total_steps - config.warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def initial_embeddings(embeddings: torch.Tensor, d_model: int) -> torch.Tensor:
    """(V, H) MoE embeddings -> (V, d_model) with unit per-dimension scale, like a fresh init. H > d_model
    keeps the top principal components; H < d_model pads with small noise."""
    x = embeddings.detach().float()
    x = x - x.mean(0, keepdim=True)
    if x.shape[1] > d_model:
        _, _, v = torch.pca_lowrank(x, q=d_model, center=False)
        x = x @ v                                                               # (V, d_model)
    elif x.shape[1] < d_model:
        x = torch.cat([x, 0.01 * x.std() * torch.randn(x.shape[0], d_model - x.shape[1])], dim=1)
    return x / x.std().clamp(min=1e-8)
