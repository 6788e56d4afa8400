"""GShard top-k gating against hand-worked examples."""

import keras
import numpy as np
import pytest

from keras_glam.layers.routing import TopKRouter
from keras_glam.layers.routing import expert_capacity
from keras_glam.layers.routing import top_k_gating

# One group, five tokens, three experts. Greedy top-2 per row:
# t0 -> (e0, e1), t1 -> (e0, e2), t2 -> (e0, e1), t3 -> (e1, e2), t4 -> (e2, e1).
HAND_PROBS = np.array(
    [
        [0.6, 0.3, 0.1],
        [0.5, 0.1, 0.4],
        [0.7, 0.2, 0.1],
        [0.2, 0.5, 0.3],
        [0.1, 0.3, 0.6],
    ],
    "float32",
)[None]


def _np(x):
    if isinstance(x, keras.Variable):
        x = x.value
    return np.asarray(keras.ops.convert_to_numpy(x))


def test_hand_worked_drops_with_capacity_two():
    routing = top_k_gating(HAND_PROBS, top_k=2, capacity=2)
    instructions = routing.instructions
    # First choices claim slots first, in token order: e0 takes t0, t1 and drops t2; e1 takes t3;
    # e2 takes t4. Second choices then start after the kept first choices of their expert:
    # t0 -> e1 slot 1 (kept), t1 -> e2 slot 1 (kept), t2 -> e1 slot 2, t3 -> e2 slot 2 and
    # t4 -> e1 slot 3 are over capacity. t3's first choice beat t0's earlier second choice.
    np.testing.assert_array_equal(
        _np(instructions.expert_index)[0], [[0, 1], [0, 2], [0, 1], [1, 2], [2, 1]]
    )
    np.testing.assert_array_equal(
        _np(instructions.expert_position)[0], [[0, 1], [1, 1], [2, 2], [0, 2], [0, 3]]
    )
    np.testing.assert_array_equal(
        _np(instructions.dispatched)[0],
        [[True, True], [True, True], [False, False], [True, False], [True, False]],
    )
    # Gates are normalised over both choices before capacity, and not renormalised after a drop.
    expected_weights = [
        [0.6 / 0.9, 0.3 / 0.9],
        [0.5 / 0.9, 0.4 / 0.9],
        [0.0, 0.0],
        [0.5 / 0.8, 0.0],
        [0.6 / 0.9, 0.0],
    ]
    np.testing.assert_allclose(_np(instructions.combine_weights)[0], expected_weights, rtol=1e-6)
    np.testing.assert_allclose(_np(routing.metrics.dropped_fraction), [1 / 5, 3 / 5])
    np.testing.assert_allclose(_np(routing.metrics.routed_per_expert), [3, 4, 3])
    np.testing.assert_allclose(_np(routing.metrics.dispatched_per_expert), [2, 2, 2])


def test_hand_worked_aux_loss():
    routing = top_k_gating(HAND_PROBS, top_k=2, capacity=2)
    # top-1 density [3, 1, 1] / 5; mean probabilities [2.1, 1.4, 1.5] / 5.
    expected = 3**2 * np.mean(np.array([0.6, 0.2, 0.2]) * np.array([0.42, 0.28, 0.30]))
    np.testing.assert_allclose(_np(routing.aux_loss), expected, rtol=1e-6)
    np.testing.assert_allclose(expected, 1.104, rtol=1e-9)


def test_aux_loss_is_one_at_perfect_balance():
    num_experts = 4
    # Token s prefers expert s (top-1 density uniform) and the mean probability is uniform.
    probs = np.full((num_experts, num_experts), 0.1, "float32")
    np.fill_diagonal(probs, 0.7)
    probs = np.stack([probs, probs[::-1]])  # two groups
    routing = top_k_gating(probs, top_k=2, capacity=4)
    np.testing.assert_allclose(_np(routing.aux_loss), 1.0, rtol=1e-6)


def test_aux_loss_averages_groups():
    probs = np.concatenate([HAND_PROBS, HAND_PROBS[:, ::-1]], axis=0)
    routing = top_k_gating(probs, top_k=2, capacity=2)
    # Reversing the token order changes neither the density nor the mean probabilities.
    np.testing.assert_allclose(_np(routing.aux_loss), 1.104, rtol=1e-6)
    skewed = np.array([[[0.9, 0.1], [0.9, 0.1]], [[0.1, 0.9], [0.6, 0.4]]], "float32")
    routing = top_k_gating(skewed, top_k=1, capacity=4)
    group_0 = 2**2 * np.mean(np.array([1.0, 0.0]) * np.array([0.9, 0.1]))
    group_1 = 2**2 * np.mean(np.array([0.5, 0.5]) * np.array([0.35, 0.65]))
    np.testing.assert_allclose(_np(routing.aux_loss), (group_0 + group_1) / 2, rtol=1e-6)


def test_padding_takes_no_slot_and_is_left_out_of_the_aux_loss():
    padding_mask = np.array([[0, 1, 1, 1, 1]])
    routing = top_k_gating(HAND_PROBS, top_k=2, capacity=2, padding_mask=padding_mask)
    instructions = routing.instructions
    # Without t0, e0 keeps t1 and t2; t2's second choice (e1) is now kept at slot 1.
    np.testing.assert_array_equal(
        _np(instructions.dispatched)[0],
        [[False, False], [True, True], [True, True], [True, False], [True, False]],
    )
    np.testing.assert_array_equal(_np(instructions.combine_weights)[0, 0], [0.0, 0.0])
    # Fractions count the four real tokens only: no first choice dropped, two second choices.
    np.testing.assert_allclose(_np(routing.metrics.dropped_fraction), [0.0, 0.5])
    np.testing.assert_allclose(_np(routing.metrics.routed_per_expert), [2, 3, 3])
    real_probs = HAND_PROBS[0, 1:]
    density = np.array([2, 1, 1]) / 4
    expected_aux = 9 * np.mean(density * real_probs.mean(axis=0))
    np.testing.assert_allclose(_np(routing.aux_loss), expected_aux, rtol=1e-6)


def test_ties_go_to_the_lowest_expert():
    probs = np.array([[[0.25, 0.375, 0.375, 0.0], [0.25, 0.25, 0.25, 0.25]]], "float32")
    routing = top_k_gating(probs, top_k=2, capacity=None)
    np.testing.assert_array_equal(_np(routing.instructions.expert_index)[0], [[1, 2], [0, 1]])


def test_top_1_uses_the_raw_probability_as_gate():
    routing = top_k_gating(HAND_PROBS, top_k=1, capacity=4)
    np.testing.assert_allclose(
        _np(routing.instructions.combine_weights)[0, :, 0], [0.6, 0.5, 0.7, 0.5, 0.6], rtol=1e-6
    )


def test_top_3_fills_slots_choice_by_choice():
    probs = np.array([[[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]], "float32")
    routing = top_k_gating(probs, top_k=3, capacity=None)
    np.testing.assert_array_equal(_np(routing.instructions.expert_index)[0], [[0, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(
        _np(routing.instructions.expert_position)[0], [[0, 0, 0], [1, 1, 1]]
    )
    np.testing.assert_allclose(_np(routing.instructions.combine_weights)[0], probs[0], rtol=1e-6)


def test_no_capacity_drops_nothing():
    probs = np.tile(np.array([0.9, 0.05, 0.05], "float32"), (1, 50, 1))
    routing = top_k_gating(probs, top_k=2, capacity=None)
    assert _np(routing.instructions.dispatched).all()
    np.testing.assert_array_equal(_np(routing.instructions.expert_position)[0, :, 0], np.arange(50))
    np.testing.assert_allclose(_np(routing.metrics.dropped_fraction), [0.0, 0.0])


@pytest.mark.parametrize(
    "group_size, num_experts, capacity_factor, expected",
    [
        (4096, 64, 1.25, 80),  # exact multiple of 4
        (100, 8, 2.0, 28),  # int(25.0) = 25, rounded up to 28
        (4096, 64, 2.5, 160),
        (30, 4, 1.0, 8),  # int(7.5) = 7 -> 8
        (2, 8, 2.0, 4),  # int(0.5) = 0 -> at least 4 (GShard would give 0)
        (6, 2, 8.0, 8),  # never more than the group's 6 tokens, rounded up to 4
    ],
)
def test_expert_capacity_rounds_up_to_multiples_of_four(
    group_size, num_experts, capacity_factor, expected
):
    assert expert_capacity(group_size, num_experts, capacity_factor) == expected


def test_expert_capacity_rejects_non_positive_factor():
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(16, 4, 0.0)


def test_top_k_larger_than_num_experts_is_an_error():
    with pytest.raises(ValueError, match="top_k"):
        top_k_gating(HAND_PROBS, top_k=4)
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(num_experts=2, top_k=3)


def test_router_is_float32_under_mixed_precision_and_ignores_quantize():
    keras.config.set_dtype_policy("mixed_bfloat16")
    router = TopKRouter(num_experts=3, name="router")
    x = np.random.normal(size=(1, 5, 4)).astype("float32")
    routing = router(keras.ops.cast(x, "bfloat16"), capacity=None)
    assert router.kernel.dtype == "float32"
    assert routing.router_probs.dtype == "float32"
    assert routing.instructions.combine_weights.dtype == "float32"
    # The bfloat16 input rounds x; the matmul itself runs in float32.
    x_bf16 = _np(keras.ops.cast(keras.ops.cast(x, "bfloat16"), "float32"))
    expected = np.exp(x_bf16 @ _np(router.kernel))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(_np(routing.router_probs), expected, rtol=1e-5)
    kernel_before = _np(router.kernel).copy()
    router.quantize("int8")
    assert router.kernel.dtype == "float32"
    np.testing.assert_array_equal(_np(router.kernel), kernel_before)


def test_router_kernel_initialiser_is_fan_in_uniform():
    router = TopKRouter(num_experts=64, name="router")
    router.build((None, None, 256))
    kernel = _np(router.kernel)
    assert kernel.shape == (256, 64)
    assert np.abs(kernel).max() <= np.sqrt(3 / 256)
    np.testing.assert_allclose(kernel.std(), 256**-0.5, rtol=0.05)


def test_router_config_round_trip():
    router = TopKRouter(num_experts=5, top_k=1, kernel_initializer="zeros", name="router")
    restored = TopKRouter.from_config(router.get_config())
    assert (restored.num_experts, restored.top_k, restored.name) == (5, 1, "router")
    restored.build((None, None, 3))
    np.testing.assert_array_equal(_np(restored.kernel), np.zeros((3, 5)))
