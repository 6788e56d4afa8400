"""`expert_loop_ffn` against batched matmuls over every row, with its hand-written backward pass
checked against JAX autodiff of that reference."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from keras_glam.layers.expert_loop import expert_loop_ffn
from keras_glam.layers.moe_feedforward import MoEFeedForward

NUM_EXPERTS, ROWS, MODEL_DIM, HIDDEN_DIM = 5, 20, 6, 12


def _reference(expert_inputs, wi, wo, rows_per_expert, activation):
    """Every row through its expert's FFN, then rows from `n_e` on zeroed."""
    filled = (np.arange(ROWS)[None, :] < rows_per_expert[:, None])[..., None]
    inputs = jnp.where(filled, expert_inputs, 0.0)
    hidden = activation(jnp.einsum("erm,emh->erh", inputs, wi))
    return jnp.where(filled, jnp.einsum("erh,ehm->erm", hidden, wo), 0.0)


def _operands(seed=0):
    rng = np.random.default_rng(seed)
    expert_inputs = rng.normal(size=(NUM_EXPERTS, ROWS, MODEL_DIM)).astype("float32")
    wi = rng.normal(size=(NUM_EXPERTS, MODEL_DIM, HIDDEN_DIM)).astype("float32")
    wo = rng.normal(size=(NUM_EXPERTS, HIDDEN_DIM, MODEL_DIM)).astype("float32")
    cotangent = rng.normal(size=(NUM_EXPERTS, ROWS, MODEL_DIM)).astype("float32")
    return expert_inputs, wi, wo, cotangent


# Empty, inside the first block, exactly one block, between blocks, full; R = 20 is not a
# multiple of the block (8), so the last static shape is the whole buffer.
ROWS_PER_EXPERT = np.array([0, 3, 8, 13, 20], "int32")


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_outputs_and_gradients_equal_batched_reference(activation):
    activation = keras.activations.get(activation)
    expert_inputs, wi, wo, cotangent = _operands()

    def loss(function):
        def value(expert_inputs, wi, wo):
            outputs = function(expert_inputs, wi, wo, jnp.asarray(ROWS_PER_EXPERT), activation)
            return jnp.sum(outputs * cotangent), outputs

        return jax.jit(jax.value_and_grad(value, argnums=(0, 1, 2), has_aux=True))

    (_, outputs), grads = loss(lambda *a: expert_loop_ffn(*a, row_block=8))(expert_inputs, wi, wo)
    (_, expected), expected_grads = loss(_reference)(expert_inputs, wi, wo)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    for name, grad, expected_grad in zip(("inputs", "wi", "wo"), grads, expected_grads):
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-4, err_msg=name)
    # The empty expert: zero outputs and zero weight gradients; rows past n_e get no gradient.
    assert not np.asarray(outputs)[0].any()
    assert not np.asarray(grads[1])[0].any() and not np.asarray(grads[2])[0].any()
    assert not np.asarray(grads[0])[1, 3:].any() and np.asarray(grads[0])[1, :3].all()


def test_rows_past_the_count_are_never_read():
    expert_inputs, wi, wo, _ = _operands(seed=1)
    garbage = expert_inputs.copy()
    for expert, rows in enumerate(ROWS_PER_EXPERT):
        garbage[expert, rows:] = np.nan
    activation = keras.activations.get("relu")
    run = jax.jit(
        lambda x: expert_loop_ffn(x, wi, wo, jnp.asarray(ROWS_PER_EXPERT), activation, row_block=8)
    )
    np.testing.assert_array_equal(np.asarray(run(garbage)), np.asarray(run(expert_inputs)))


def test_auto_dispatch_resolves_to_the_expert_loop_on_cpu():
    moe = MoEFeedForward(num_experts=4, intermediate_dim=8)
    assert keras.distribution.list_devices()[0].lower().startswith("cpu")
    assert moe._dispatch_mode() == "sort_loop"
