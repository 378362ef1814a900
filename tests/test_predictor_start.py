"""The one-pass predictor start (incremental.prefill) against the token-by-token path (feed_stepwise):
same last-token probabilities, same states, and the same probabilities over decoding steps after it."""

from __future__ import annotations

import pytest
import torch

from expertflow.embedded import EMBEDDED_PREDICTOR_DIR
from expertflow.predictor.incremental import StepState, feed_stepwise, prefill
from expertflow.predictor.model import PredictorConfig, RoutingPathModel
from expertflow.predictor.runtime import RoutingPredictor

TOLERANCE = dict(atol=1e-5, rtol=1e-5)
STEPS_AFTER = 20


def small_predictor(head_hidden: int) -> RoutingPredictor:
    torch.manual_seed(0)
    return RoutingPredictor(RoutingPathModel(PredictorConfig(
        vocab_size=96, num_layers=3, num_experts=8, top_k=2, d_model=16, d_ff=32, num_heads=2, window=8,
        head_hidden=head_hidden, dropout=0.0)))


@pytest.fixture(scope="module")
def shipped() -> RoutingPredictor:
    return RoutingPredictor.load(EMBEDDED_PREDICTOR_DIR)


def ragged_prompts(config: PredictorConfig, seed: int) -> list[list[int]]:
    """Lengths 1, 2, W-1, W, W+5, 3W and past the receptive field (the tail cut), in mixed order."""
    W = config.window - 1
    lengths = [3 * W, 1, W + 5, 2, config.receptive_field + 10, W - 1, W]
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def assert_states_close(actual: StepState, expected: StepState) -> None:
    assert torch.equal(actual.valid, expected.valid)
    for attr in ("encoder", "decoder_self", "decoder_cross"):
        for (k, v), (ek, ev) in zip(getattr(actual, attr), getattr(expected, attr), strict=True):
            torch.testing.assert_close(k, ek, **TOLERANCE)
            torch.testing.assert_close(v, ev, **TOLERANCE)


def assert_start_matches_stepping(predictor: RoutingPredictor, prompts: list[list[int]]) -> None:
    model, vocab = predictor.model, predictor.config.vocab_size
    logits, state = prefill(model, prompts)
    expected_logits, expected = feed_stepwise(model, prompts)
    torch.testing.assert_close(torch.sigmoid(logits), torch.sigmoid(expected_logits), **TOLERANCE)
    assert_states_close(state, expected)
    g = torch.Generator().manual_seed(len(prompts))
    for _ in range(STEPS_AFTER):
        tokens = torch.randint(0, vocab, (len(prompts),), generator=g).tolist()
        state, probs = predictor.step(state, tokens)
        expected, expected_probs = predictor.step(expected, tokens)
        torch.testing.assert_close(probs, expected_probs, **TOLERANCE)
    assert_states_close(state, expected)


@pytest.mark.parametrize("head_hidden", [0, 8])
def test_one_pass_start_equals_stepping_on_a_random_predictor(head_hidden: int) -> None:
    predictor = small_predictor(head_hidden)
    assert_start_matches_stepping(predictor, ragged_prompts(predictor.config, seed=1))


def test_one_pass_start_equals_stepping_on_the_shipped_predictor(shipped: RoutingPredictor) -> None:
    assert_start_matches_stepping(shipped, ragged_prompts(shipped.config, seed=2))


@pytest.mark.parametrize("length", [1, 5, 30])
def test_one_pass_start_of_one_prompt_equals_stepping(shipped: RoutingPredictor, length: int) -> None:
    g = torch.Generator().manual_seed(length)
    prompt = torch.randint(0, shipped.config.vocab_size, (length,), generator=g).tolist()
    assert_start_matches_stepping(shipped, [prompt])


def test_start_gives_the_full_forward_at_each_prompt_end() -> None:
    predictor = small_predictor(head_hidden=8)
    prompts = ragged_prompts(predictor.config, seed=3)
    state, probs = predictor.start(prompts)
    expected = torch.stack([predictor.predict_next([ids])[0] for ids in prompts])
    torch.testing.assert_close(probs, expected, **TOLERANCE)
    rows, row_probs = predictor.start_rows(prompts)
    torch.testing.assert_close(row_probs, probs, rtol=0, atol=0)
    assert_states_close(StepState.concat(rows), state)


def test_start_checks_its_prompts() -> None:
    predictor = small_predictor(head_hidden=0)
    with pytest.raises(ValueError, match="non-empty"):
        predictor.start([[1, 2], []])
    with pytest.raises(ValueError, match="token ids"):
        predictor.start([[1, predictor.config.vocab_size]])


def test_step_builds_every_tensor_on_the_models_device() -> None:
    """On the meta device any tensor made on the CPU by mistake fails the op it meets (as it would on CUDA).
    (prefill reads prompt lengths, which meta tensors do not hold; it places its tensors by the model.)"""
    from expertflow.predictor.incremental import empty_state, step

    model = RoutingPathModel(PredictorConfig(vocab_size=32, num_layers=2, num_experts=4, top_k=1, d_model=8,
                                             d_ff=16, num_heads=2, window=4, dropout=0.0)).to("meta").eval()
    state = empty_state(model, 2)
    assert state.valid.device.type == "meta"
    logits, state = step(model, state, torch.tensor([5, 6]), torch.tensor([True, False]))  # inputs from the host
    assert logits.shape == (2, 2, 4) and logits.device.type == "meta"
    logits, _ = step(model, state, torch.tensor([7, 8]))
    assert logits.device.type == "meta"
