"""Token logprobs for `echo`/`logprobs` completions: one plain forward of the offloaded model over the
whole sequence. The offloaded experts compute exactly what transformers' own modules do, so these are the
logprobs a transformers forward (and lm-eval's `hf` backend) gives.

Shape legend: S sequence length, V vocabulary."""

from __future__ import annotations

from collections.abc import Callable

import torch

from expertflow.engine.runner import DecoderRunner
from expertflow.server.schemas import Logprobs


@torch.inference_mode()
def token_logprobs(engine: DecoderRunner, ids: list[int]) -> torch.Tensor:
    """(S, V) log-softmax of the next-token logits after each prefix of `ids`. Runs on the engine thread:
    a forward outside the session leaves nothing behind, as every forward overwrites all the routing the
    session's recorder reads and the cache is told a step begins, as the engine's own forward does."""
    engine.parts.cache.begin_step(None)
    logits = engine.model(input_ids=torch.tensor([ids], device=engine.device), use_cache=False).logits
    return torch.log_softmax(logits[0].to(torch.float32), dim=-1)


def logprobs_object(ids: list[int], logp: torch.Tensor, first: int, top: int,
                    piece: Callable[[int], str]) -> Logprobs:
    """The OpenAI object for tokens ids[first:]; ids[0] has no logprob (nothing precedes it).
    `piece(id)` is one token's text; `top` is how many alternatives each position lists."""
    tokens, values, tops, offsets = [], [], [], []
    offset = 0
    for i in range(first, len(ids)):
        text = piece(ids[i])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if i == 0:
            values.append(None)
            tops.append(None)
            continue
        row = logp[i - 1]
        values.append(float(row[ids[i]]))
        best = torch.topk(row, max(top, 1))
        alternatives: dict[str, float] = {}
        for t, v in zip(best.indices.tolist(), best.values.tolist()):
            alternatives.setdefault(piece(t), v)  # two ids with one text: keep the likelier, as it comes first
        tops.append(alternatives)
    return Logprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)
