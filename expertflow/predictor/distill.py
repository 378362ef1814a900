"""The MoE model's own router logits as soft targets for the RPP (knowledge distillation).

Shape legend: B sequences, S positions, L MoE layers, E experts.

A trace keeps only each token's top-k expert ids, so the BCE loss sees which experts won but not which
came close. Rerunning the traced model over a trace's tokens gives every router's full logits; a KL term
between their softmax and the predictor's then teaches the ordering of the near misses too, the signal
that decides a batch's union of experts. The model runs once per training sequence, before training;
its logits are kept in float16 (a 1.6M-token training set takes ~0.8 GB).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoConfig

from expertflow.adapters import MoEAdapter, adapter_for
from expertflow.errors import ExpertflowError


class RouterTeacher:
    """A decoder-only MoE model with hooks on its routers: `logits(ids)` -> (S, L, E) per sequence."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter) -> None:
        if adapter.kind != "decoder":
            raise ExpertflowError("router distillation supports decoder-only models; train this one without "
                                  "--distill-model")
        self.model = model.eval()
        self.adapter = adapter
        self.layers = adapter.moe_layers(model)
        self._captured: dict[int, torch.Tensor] = {}

    @classmethod
    def load(cls, model_dir: str | Path) -> "RouterTeacher":
        """The checkpoint through plain transformers, every expert in memory (training needs the whole model)."""
        try:
            config = AutoConfig.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            raise ExpertflowError(f"{model_dir}: not a model directory ({str(exc).splitlines()[0]})") from None
        adapter = adapter_for(config)
        return cls(adapter.auto_class.from_pretrained(model_dir, dtype=torch.float32), adapter)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @torch.inference_mode()
    def logits(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Sequences (S_i,) -> float16 (S_i, L, E) router logits at every position, one batched forward
        (right-padded: causal attention keeps the padding out of the real positions)."""
        lengths = [len(ids) for ids in sequences]
        ids = torch.full((len(sequences), max(lengths)), 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(sequences):
            ids[i, : len(seq)] = torch.as_tensor(seq.astype(np.int64))
            mask[i, : len(seq)] = 1
        hooks = [self.model.get_submodule(self.adapter.router_path(layer)).register_forward_hook(self._capture(i))
                 for i, layer in enumerate(self.layers)]
        try:
            self.model(input_ids=ids, attention_mask=mask)
        finally:
            for hook in hooks:
                hook.remove()
        out = torch.stack([self._captured[i].reshape(*ids.shape, -1) for i in range(len(self.layers))], dim=2)
        self._captured.clear()
        return [out[i, :n].to(torch.float16).numpy() for i, n in enumerate(lengths)]     # (S, L, E) each

    def _capture(self, index: int):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            self._captured[index] = self.adapter.router_logits(output).float()
        return hook

    def logits_of(self, sequences: Sequence[np.ndarray], progress: bool = True, batch_size: int = 16) -> list[np.ndarray]:
        """Every sequence's (S, L, E) logits, in order; batches of similar lengths waste little on padding."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        out: list[np.ndarray | None] = [None] * len(sequences)
        with tqdm(total=len(sequences), desc="router logits", unit="seq", disable=not progress) as bar:
            for g in range(0, len(order), batch_size):
                group = order[g : g + batch_size]
                for i, logits in zip(group, self.logits([sequences[i] for i in group])):
                    out[i] = logits
                bar.update(len(group))
        return out


def check_against_traces(teacher: RouterTeacher, num_layers: int, num_experts: int) -> None:
    """The teacher must be the traced model: same MoE layer count and experts per layer."""
    if (len(teacher.layers), teacher.adapter.num_experts) != (num_layers, num_experts):
        raise ExpertflowError(f"--distill-model has {len(teacher.layers)} MoE layers x {teacher.adapter.num_experts} "
                              f"experts but the traces {num_layers} x {num_experts}: pass the traced model")
