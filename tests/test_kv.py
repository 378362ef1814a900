"""Merge and Reindex of KV caches: regrouped sequences decode exactly as they would alone."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from expertflow.adapters.kv_argument import KVArgument
from expertflow.engine.kv import KVBatch, merge, select

PROMPTS = [[5, 17, 33, 8, 41, 60, 12], [70, 3, 9], [11, 12, 13, 14, 15], [40, 41, 42, 43, 44, 45, 46, 47, 48]]


def _left_pad(prompts):
    width = max(map(len, prompts))
    ids = torch.ones((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    return ids, mask


def _forward(model, ids, batch: KVBatch | None, mask):
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -ids.shape[1]:]
    kv = KVArgument.of(model.forward)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                **kv.inputs(None if batch is None else batch.cache), use_cache=True)
    return out.logits[:, -1].float(), KVBatch(kv.output(out), mask)


def _decode(model, batch: KVBatch, logits, steps):
    tokens = []
    for _ in range(steps):
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        mask = torch.cat([batch.mask, torch.ones(batch.rows, 1, dtype=batch.mask.dtype)], dim=1)
        logits, batch = _forward(model, nxt[:, None], batch, mask)
    return torch.stack(tokens, 1), batch, logits


@torch.no_grad()
def test_merged_and_reindexed_sequences_decode_as_alone(tiny_mixtral_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.float32).eval()
    alone = []
    for p in PROMPTS:
        ids, mask = _left_pad([p])
        logits, b = _forward(model, ids, None, mask)
        alone.append(_decode(model, b, logits, 8)[0][0])

    ids, mask = _left_pad(PROMPTS[:2])
    la, a = _forward(model, ids, None, mask)
    ta, a, la = _decode(model, a, la, 3)
    ids, mask = _left_pad(PROMPTS[2:])
    lb, b = _forward(model, ids, None, mask)
    tb, b, lb = _decode(model, b, lb, 3)

    order = [3, 0, 2, 1]
    both = merge([a, b])
    regrouped = select(both, order)
    logits = torch.cat([la, lb])[order]
    rest, _, _ = _decode(model, regrouped, logits, 5)
    first = torch.cat([ta, tb])[order]
    for row, seq in enumerate(order):
        assert torch.cat([first[row], rest[row]]).tolist() == alone[seq].tolist()


@torch.no_grad()
def test_select_drops_columns_that_are_padding_everywhere(tiny_mixtral_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.float32).eval()
    ids, mask = _left_pad(PROMPTS)
    _, batch = _forward(model, ids, None, mask)
    short = select(batch, [1, 2])  # lengths 3 and 5: 4 columns were padding in both
    assert short.mask.shape == (2, 5)
    assert short.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert all(layer.keys.shape[2] == 5 for layer in short.cache.layers)
    assert batch.mask.shape == (4, 9)  # the source batch is left as it was
    assert all(layer.keys.shape[0] == 4 for layer in batch.cache.layers)
