"""The FLOPs count (methods/core/flops.py) against the formula written out per layer and per half."""

import pytest

from methods.core.flops import (
    LLMShape,
    attention_flops,
    layer_flops,
    mlp_flops,
    prefill_flops,
    retention_numbers,
    tokens_within,
)

SHAPE = LLMShape(64, 128, 4)
SEVEN_B = LLMShape(3584, 18944, 28)


def literal(text, attention, mlp, d, m):
    """Each layer: its attention (4nd² + 2n²d) on text + attention[i] tokens, its MLP (2n'dm) on
    text + mlp[i]."""
    total = 0
    for a, b in zip(attention, mlp):
        n, n_mlp = text + a, text + b
        total += 4 * n * d * d + 2 * n * n * d + 2 * n_mlp * d * m
    return total


def test_split_prefill_flops_is_the_literal_per_layer_sum():
    attention, mlp = [100, 100, 50, 50], [100, 50, 50, 20]  # drops inside layers 1 and 3
    assert prefill_flops(10, attention, SHAPE, mlp) == literal(10, attention, mlp, 64, 128)
    # without MLP counts (or the same ones) each layer is one 4nd² + 2n²d + 2ndm, as before
    assert prefill_flops(10, attention, SHAPE) == prefill_flops(10, attention, SHAPE, attention) == \
        literal(10, attention, attention, 64, 128) == sum(layer_flops(10 + a, 64, 128) for a in attention)
    assert layer_flops(7, 64, 128) == attention_flops(7, 64) + mlp_flops(7, 64, 128)
    with pytest.raises(ValueError, match="4 attention and 3 MLP per-layer token counts"):
        prefill_flops(10, attention, SHAPE, mlp[:3])


def test_retention_numbers_with_split_counts():
    attention, mlp = [200, 200, 80, 80], [200, 80, 80, 80]  # a drop inside layer 1
    numbers = retention_numbers(400, 10, attention, SHAPE, mlp)
    assert numbers["rho_tok"] == 80 / 400  # the first pruned layer, by what its attention sees
    assert numbers["rho_avg"] == (200 + 200 + 80 + 80) / (4 * 400)  # attention counts
    assert numbers["rho_visual"] == 200 / 400
    pruned = literal(10, attention, mlp, 64, 128)
    assert numbers["rho_flops"] == pruned / literal(10, [400] * 4, [400] * 4, 64, 128)
    assert numbers["prefill_tflops"] == pruned / 1e12
    # the same counts for both halves: what the single list gave before
    assert retention_numbers(400, 10, attention, SHAPE) == retention_numbers(400, 10, attention, SHAPE, attention)


@pytest.mark.parametrize("layers, mlp_only", [(28, 0), (5, 1), (1, 3), (0, 1), (0, 4)])
def test_tokens_within_solves_whole_layers_and_mlp_halves(layers, mlp_only):
    text, budget = 100, 3e13
    v = tokens_within(budget, layers, text, SEVEN_B, mlp_only)
    cost = layers * layer_flops(text + v, 3584, 18944) + mlp_only * mlp_flops(text + v, 3584, 18944)
    assert cost == pytest.approx(budget, rel=1e-12)
    if mlp_only == 0:  # the old call form
        assert tokens_within(budget, layers, text, SEVEN_B) == v
    assert tokens_within(1.0, max(layers, 1), text, SEVEN_B, mlp_only) < 0  # not even the text fits


def test_tokens_within_needs_something_to_solve_over():
    with pytest.raises(ValueError, match="0 layers and 0 MLP halves"):
        tokens_within(1e12, 0, 10, SHAPE)
