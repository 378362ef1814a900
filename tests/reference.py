"""Plain transformers as the reference every offloaded run must match."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def reference_generate(model_dir: Path, prompts: list[list[int]], max_new_tokens: int, pad_token_id: int,
                       experts_implementation: str | None = None,
                       dtype: torch.dtype | str = torch.float32,
                       device: str = "cpu") -> tuple[list[list[int]], torch.Tensor]:
    """Greedy `model.generate` on left-padded prompts: generated ids per prompt (cut after eos) and last logits.
    `dtype="auto"` is transformers' default: the checkpoint's own."""
    if experts_implementation is None and device != "cpu":
        # On CUDA transformers' default is grouped_mm, whose kernels round differently from the eager loop that
        # the offloaded experts reproduce op for op; the eager loop is the reference there.
        experts_implementation = "eager"
    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs).to(device).eval()
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_token_id, output_logits=True, return_dict_in_generate=True)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    sequences = []
    for row in out.sequences[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        sequences.append(row[:cut])
    return sequences, out.logits[-1].float().cpu()
