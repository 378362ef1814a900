"""The offloaded experts module: its one-token loop (batch-1 decoding) computes the same bits as the
eager loop it stands in for, and falls back to that loop whenever it does not apply."""

from __future__ import annotations

import pytest
import torch

from expertflow.api import ExpertflowModel
from expertflow.config import EngineConfig


@pytest.fixture(scope="module")
def experts(embedded_model_dir):
    model = ExpertflowModel(EngineConfig(model=embedded_model_dir, cache_experts=16, policy="lru"))
    parts = model.engine.parts
    yield parts.model.get_submodule(parts.adapter.experts_path(parts.layers[0]))
    model.close()


def _eager(module, hidden, index, weights):
    # A non-contiguous copy of the token's row: same values, but the module takes its general (eager) loop.
    wide = torch.zeros(hidden.shape[0], 2 * hidden.shape[1])
    wide[:, ::2] = hidden
    return module(wide[:, ::2], index, weights)


@pytest.mark.parametrize("index", [[[3, 17]], [[17, 3]], [[0, 31]], [[5, 32]]])  # 32 = E: no expert
def test_one_token_loop_equals_the_eager_loop_bit_for_bit(experts, index):
    torch.manual_seed(0)
    hidden = torch.randn(1, 128)
    weights = torch.softmax(torch.randn(1, 2), dim=-1)
    index = torch.tensor(index)
    fast = experts(hidden, index, weights)
    assert torch.equal(fast, _eager(experts, hidden, index, weights))
    assert fast.abs().sum() > 0


def test_repeated_expert_and_several_tokens_take_the_eager_loop(experts):
    torch.manual_seed(1)
    hidden, weights = torch.randn(3, 128), torch.rand(3, 2)
    index = torch.tensor([[4, 9], [9, 4], [1, 4]])
    assert torch.equal(experts(hidden, index, weights), _eager(experts, hidden, index, weights))
    repeated = torch.tensor([[6, 6]])
    assert torch.equal(experts(hidden[:1], repeated, weights[:1]), _eager(experts, hidden[:1], repeated, weights[:1]))
