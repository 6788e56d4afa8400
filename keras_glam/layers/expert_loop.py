"""Expert FFNs on the filled rows of their capacity buffers: a loop over experts, for CPUs.

With capacity dispatch each expert owns `R` buffer rows, of which only the first `n_e` hold
tokens (at capacity factor 2.5 about 80% of them on average). Batched matmuls over `[E, R]` rows
multiply the empty rows too, and on XLA:CPU a batch of 64 `[R, M] x [M, H]` products runs well
below the speed of one large matmul. This loop visits one expert at a time and multiplies only
`n_e` rows, rounded up to a multiple of `row_block` so that a handful of static shapes (chosen by
`lax.switch`) cover every count; its backward pass is written the same way (a `custom_vjp`), so
neither pass touches the empty rows.

Measured on the project's 2-core CPU (T=4096, M=256, H=1024, E=64, top-2, capacity factor 2.5,
forward and backward of the experts alone): 1.31-1.37x the time of the FLOP-matched dense FFN,
against 1.52-1.58x for batched matmuls over all `[E, R]` rows (the whole layer: see
`benchmarks/README.md`). `MoEFeedForward` uses the loop for `dispatch="sort_loop"`, the `"auto"`
choice on CPU. It runs expert after expert and does not partition under GSPMD; on GPU, where a
batched matmul is one large kernel, `"auto"` keeps the batched matmuls (not measured: no
accelerator was available).

Written in JAX (the loop and its hand-written backward pass have no Keras-ops equivalent).
"""

import functools
import math

import jax
import jax.numpy as jnp


def expert_loop_ffn(expert_inputs, wi, wo, rows_per_expert, activation, row_block=None):
    """`y[e, :n_e] = activation(x[e, :n_e] @ wi[e]) @ wo[e]`, zeros in the rows below.

    Args:
        expert_inputs: `[E, R, M]`, each expert's tokens in its first `n_e` rows.
        wi: `[E, M, H]`.
        wo: `[E, H, M]`.
        rows_per_expert: int32 `[E]`, `n_e <= R`. Rows from `n_e` on are ignored: they do
            not affect anything, their outputs and gradients are zero.
        activation: elementwise callable on `[rows, H]`.
        row_block: int or None, rows are processed in multiples of it (`R / row_block + 1`
            static shapes are compiled). None: 16, or more for large buffers so that at most
            17 shapes are compiled.

    Returns:
        `[E, R, M]` in the dtype of the products.

    Example:

    >>> import jax, numpy as np
    >>> x = np.ones((2, 8, 4), "float32")
    >>> wi, wo = np.ones((2, 4, 3), "float32"), np.ones((2, 3, 4), "float32")
    >>> y = expert_loop_ffn(x, wi, wo, np.array([5, 0], "int32"), jax.nn.relu)
    >>> np.asarray(y)[0, :, 0].tolist()  # 4 * 3 = 12 in the 5 filled rows of expert 0
    [12.0, 12.0, 12.0, 12.0, 12.0, 0.0, 0.0, 0.0]
    >>> float(np.abs(np.asarray(y)[1]).sum())  # expert 1 has no rows
    0.0
    """
    row_block = row_block or default_row_block(expert_inputs.shape[1])
    return _expert_loop(expert_inputs, wi, wo, rows_per_expert, activation, row_block)


def default_row_block(total_rows):
    """16 rows, or for `R > 256` rows the multiple of 8 that keeps the static shapes at most 17.

    Measured at R = 160 (T = 4096, E = 64, capacity factor 2.5): blocks of 8, 16 and 32 rows ran
    equally fast; 16 keeps the shapes few.
    """
    return max(16, -(-math.ceil(total_rows / 16) // 8) * 8)


def _row_counts(total_rows, row_block):
    """The static row counts the loop compiles: `0, b, 2b, ...` up to `R`."""
    num_blocks = math.ceil(total_rows / row_block)
    return sorted({min(k * row_block, total_rows) for k in range(num_blocks + 1)})


def _select_rows(rows, counts):
    """Index into `counts` of the smallest count `>= rows` (counts are `0, b, 2b, ..., R`)."""
    block = counts[1] if len(counts) > 1 else 1
    return jnp.minimum((rows + block - 1) // block, len(counts) - 1)


def _pad_rows(x, total_rows):
    return jnp.pad(x, ((0, total_rows - x.shape[0]), (0, 0)))


def _first_rows(x, num_rows, rows):
    """`x[:num_rows]` with the rows from `rows` on zeroed (the tail of the last block)."""
    return jnp.where(jnp.arange(num_rows)[:, None] < rows, x[:num_rows], 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _expert_loop(expert_inputs, wi, wo, rows_per_expert, activation, row_block):
    outputs, _ = _forward(expert_inputs, wi, wo, rows_per_expert, activation, row_block)
    return outputs


def _forward(expert_inputs, wi, wo, rows_per_expert, activation, row_block):
    """Outputs `[E, R, M]` and pre-activations `[E, R, H]` (kept for the backward pass)."""
    total_rows = expert_inputs.shape[1]
    counts = _row_counts(total_rows, row_block)

    def branch(num_rows):
        def run(x, w_in, w_out, rows):
            if num_rows == 0:
                return (
                    jnp.zeros((total_rows, w_out.shape[-1]), x.dtype),
                    jnp.zeros((total_rows, w_in.shape[-1]), x.dtype),
                )
            pre_activation = _first_rows(x, num_rows, rows) @ w_in
            outputs = _first_rows(activation(pre_activation) @ w_out, num_rows, rows)
            return _pad_rows(outputs, total_rows), _pad_rows(pre_activation, total_rows)

        return run

    branches = [branch(n) for n in counts]

    def expert(carry, per_expert):
        x, w_in, w_out, rows = per_expert
        return carry, jax.lax.switch(_select_rows(rows, counts), branches, x, w_in, w_out, rows)

    _, (outputs, pre_activations) = jax.lax.scan(
        expert, None, (expert_inputs, wi, wo, rows_per_expert)
    )
    return outputs, pre_activations


def _expert_loop_forward(expert_inputs, wi, wo, rows_per_expert, activation, row_block):
    outputs, pre_activations = _forward(
        expert_inputs, wi, wo, rows_per_expert, activation, row_block
    )
    return outputs, (expert_inputs, wi, wo, rows_per_expert, pre_activations)


def _expert_loop_backward(activation, row_block, residuals, output_grads):
    expert_inputs, wi, wo, rows_per_expert, pre_activations = residuals
    total_rows = expert_inputs.shape[1]
    counts = _row_counts(total_rows, row_block)

    def branch(num_rows):
        def run(x, w_in, w_out, pre_activation, output_grad, rows):
            if num_rows == 0:
                return jnp.zeros_like(x), jnp.zeros_like(w_in), jnp.zeros_like(w_out)
            x, output_grad = _first_rows(x, num_rows, rows), _first_rows(output_grad, num_rows, rows)
            hidden, activation_vjp = jax.vjp(activation, pre_activation[:num_rows])
            (pre_activation_grad,) = activation_vjp(output_grad @ w_out.T)
            return (
                _pad_rows(pre_activation_grad @ w_in.T, total_rows),
                x.T @ pre_activation_grad,
                hidden.T @ output_grad,
            )

        return run

    branches = [branch(n) for n in counts]

    def expert(carry, per_expert):
        rows = per_expert[-1]
        return carry, jax.lax.switch(_select_rows(rows, counts), branches, *per_expert)

    _, (input_grads, wi_grads, wo_grads) = jax.lax.scan(
        expert,
        None,
        (expert_inputs, wi, wo, pre_activations, output_grads, rows_per_expert),
    )
    return input_grads, wi_grads, wo_grads, None


_expert_loop.defvjp(_expert_loop_forward, _expert_loop_backward)
