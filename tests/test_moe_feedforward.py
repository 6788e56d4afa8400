"""MoEFeedForward against independent references: a dense JAX-NumPy computation (every expert
on every token, combined with the top-k gates), a loop-based slot assignment, hand-worked routing.
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from keras_glam.layers.moe_feedforward import MoEFeedForward
from keras_glam.layers.routing import expert_capacity

MODEL_DIM, HIDDEN_DIM, NUM_EXPERTS = 8, 16, 4
# The tests build many tiny programs: skipping LLVM optimisation halves their compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _np(x):
    if isinstance(x, keras.Variable):
        x = x.value
    return np.asarray(keras.ops.convert_to_numpy(x)).astype(np.float32)


def _weights(moe):
    return {v.path.split("/", 1)[1]: _np(v) for v in moe.trainable_variables}


def _make_layer(x, router_scale=1.0, **kwargs):
    kwargs.setdefault("num_experts", NUM_EXPERTS)
    kwargs.setdefault("intermediate_dim", HIDDEN_DIM)
    moe = MoEFeedForward(name="moe", **kwargs)
    moe.build(x.shape)
    moe.router.kernel.assign(router_scale * _np(moe.router.kernel))
    return moe


def _inputs(batch, length, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, length, MODEL_DIM)).astype("float32")


# ---------------------------------------------------------------------------------------------
# Reference implementation, written independently of keras_glam.


def reference_choices(probs, top_k):
    """Greedy top-k = the k largest probabilities, ties to the lowest index (stable sort)."""
    return np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]


def reference_kept(choices, num_experts, num_groups, capacity, is_real):
    """GShard slot filling by explicit loops: choice by choice, token by token, per group."""
    num_tokens, top_k = choices.shape
    group_size = num_tokens // num_groups
    kept = np.zeros(choices.shape, bool)
    for group in range(num_groups):
        load = np.zeros(num_experts, int)
        for j in range(top_k):
            for token in range(group * group_size, (group + 1) * group_size):
                expert = choices[token, j]
                if is_real[token] and (capacity is None or load[expert] < capacity):
                    kept[token, j] = True
                    load[expert] += 1
    return kept


def reference_moe(params, x, choices, kept, is_real, num_groups):
    """Dense MoE: every expert on every token, combined with the kept, normalised gates.

    Returns the outputs `[T, M]` and the GShard aux loss (real tokens, mean over groups).
    """
    router_kernel, wi, wo = params
    num_experts, top_k = wi.shape[0], choices.shape[1]
    probs = jax.nn.softmax(x @ router_kernel, axis=-1)
    chosen = jnp.take_along_axis(probs, choices, axis=1)
    if top_k > 1:
        chosen = chosen / (chosen.sum(-1, keepdims=True) + 1e-9)
    gate_matrix = jnp.einsum("tk,tke->te", chosen * kept, jax.nn.one_hot(choices, num_experts))
    every_expert = jnp.einsum("teh,ehm->tem", jax.nn.relu(jnp.einsum("tm,emh->teh", x, wi)), wo)
    outputs = jnp.einsum("te,tem->tm", gate_matrix, every_expert)

    real = jnp.asarray(is_real, jnp.float32).reshape(num_groups, -1, 1)
    top1 = jax.nn.one_hot(choices[:, 0], num_experts).reshape(num_groups, -1, num_experts)
    density = (top1 * real).sum(1) / real.sum(1)
    mean_probs = (probs.reshape(num_groups, -1, num_experts) * real).sum(1) / real.sum(1)
    aux = jnp.mean(num_experts**2 * jnp.mean(density * mean_probs, axis=-1))
    return outputs, aux


def _reference_loss(params, tokens, choices, kept, is_real, cotangent, num_groups):
    outputs, aux = reference_moe(params, tokens, choices, kept, is_real, num_groups)
    return jnp.sum(outputs * cotangent) + 0.01 * aux, (outputs, aux)


_reference_executables = {}


def _reference_value_and_grad(*args):
    """Compiled once per shapes and shared by the tests (most use 64 tokens)."""
    key = tuple((np.shape(a), np.asarray(a).dtype) for a in jax.tree.leaves(args[:-1]))
    key += (args[-1],)
    if key not in _reference_executables:
        function = jax.value_and_grad(_reference_loss, argnums=(0, 1), has_aux=True)
        _reference_executables[key] = (
            jax.jit(function, static_argnums=6).lower(*args).compile(compiler_options=FAST_COMPILE)
        )
    return _reference_executables[key](*args[:-1])


def reference_outputs_and_grads(moe, x, cotangent, is_real, num_groups, capacity):
    weights = _weights(moe)
    params = (weights["router/kernel"], weights["expert_wi/kernel"], weights["expert_wo/kernel"])
    tokens = x.reshape(-1, MODEL_DIM)
    logits = tokens @ params[0]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    choices = reference_choices(probs / probs.sum(-1, keepdims=True), moe.top_k)
    kept = reference_kept(choices, moe.num_experts, num_groups, capacity, is_real)
    (_, (outputs, aux)), (param_grads, input_grads) = _reference_value_and_grad(
        params, tokens, choices, kept, is_real, cotangent.reshape(tokens.shape), num_groups
    )
    grads = dict(zip(["router/kernel", "expert_wi/kernel", "expert_wo/kernel"], param_grads))
    return outputs.reshape(x.shape), aux, grads, input_grads.reshape(x.shape), kept


def _compile_and_run(fn, *args):
    """`jax.jit(fn)(*args)`, compiled with `FAST_COMPILE`."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def run_layer(moe, x, padding_mask=None, training=False, return_routing=False):
    """A compiled call of `moe` (eager calls compile every op separately: slow in tests).

    Updates the layer's non-trainable variables like an eager call; returns what the call
    returns, and the added losses.
    """

    def call(trainable, non_trainable, x):
        return moe.stateless_call(
            trainable,
            non_trainable,
            x,
            padding_mask=padding_mask,
            training=training,
            return_routing=return_routing,
            return_losses=True,
        )

    outputs, non_trainable, losses = _compile_and_run(
        call,
        [v.value for v in moe.trainable_variables],
        [v.value for v in moe.non_trainable_variables],
        jnp.asarray(x),
    )
    for variable, value in zip(moe.non_trainable_variables, non_trainable):
        variable.assign(value)
    return outputs, losses


def layer_outputs_and_grads(moe, x, cotangent, padding_mask=None, training=True):
    """Outputs, added losses, gradients (by weight path, and w.r.t. x) of `sum(y * cot) + losses`.

    Updates the layer's non-trainable variables like an eager call.
    """
    non_trainable = [v.value for v in moe.non_trainable_variables]

    def loss(trainable, x):
        outputs, non_trainable_updates, losses = moe.stateless_call(
            trainable,
            non_trainable,
            x,
            padding_mask=padding_mask,
            training=training,
            return_losses=True,
        )
        loss = jnp.sum(outputs * cotangent) + sum(losses)
        return loss, (outputs, losses, non_trainable_updates)

    (_, (outputs, losses, updates)), (weight_grads, input_grads) = _compile_and_run(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
        [v.value for v in moe.trainable_variables],
        jnp.asarray(x),
    )
    for variable, value in zip(moe.non_trainable_variables, updates):
        variable.assign(value)
    names = [v.path.split("/", 1)[1] for v in moe.trainable_variables]
    return np.asarray(outputs), losses, dict(zip(names, weight_grads)), np.asarray(input_grads)


def assert_matches_reference(moe, x, padding_mask, training, num_groups, capacity):
    """Outputs, aux loss and every gradient of `moe` equal the dense reference's.

    Returns the reference's kept-choice mask `[T, k]` and the layer's gradients.
    """
    cotangent = np.random.default_rng(7).normal(size=x.shape).astype("float32")
    is_real = np.ones(x.shape[:2], bool) if padding_mask is None else padding_mask != 0
    expected, aux, expected_grads, expected_input_grad, kept = reference_outputs_and_grads(
        moe, x, cotangent, is_real.reshape(-1), num_groups, capacity
    )
    outputs, losses, grads, input_grad = layer_outputs_and_grads(
        moe, x, cotangent, padding_mask, training
    )
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(losses[0]), 0.01 * aux, rtol=1e-5)
    for name, expected_grad in expected_grads.items():
        np.testing.assert_allclose(
            np.asarray(grads[name]), expected_grad, rtol=1e-4, atol=1e-5, err_msg=name
        )
    np.testing.assert_allclose(input_grad, expected_input_grad, rtol=1e-4, atol=1e-5)
    return kept, grads


# ---------------------------------------------------------------------------------------------
# Most tests use 64 tokens (batch x length = 2 x 32 or 4 x 16) so compilations are shared.


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("path", ["einsum", "sort", "sort_loop", "dropless"])
def test_matches_dense_reference_without_drops(path, top_k):
    x = _inputs(batch=4, length=16)
    if path == "dropless":
        # 64 tokens over 4 experts: the block-sorted scan, blocks of 8 rows (4 for top-1).
        moe = _make_layer(x, top_k=top_k)
        kept, _ = assert_matches_reference(moe, x, None, False, num_groups=1, capacity=None)
    else:
        # Two groups of 32 tokens and capacity_factor 4.0: C = 32, nothing can drop.
        moe = _make_layer(x, top_k=top_k, dispatch=path, num_groups=2, capacity_factor=4.0)
        kept, _ = assert_matches_reference(moe, x, None, True, num_groups=2, capacity=32)
    assert kept.all()


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize(
    "num_tokens, num_experts",
    [
        (3, 8),  # 3 or 6 choices over 8 experts: one row per block, one expert per choice.
        (8, 4),  # 2 or 4 choices per expert: capacity buffers.
        (16, 8),  # 2 or 4 choices per expert: capacity buffers.
    ],
)
def test_dropless_decoding_sized_input_matches_reference(num_tokens, num_experts, top_k):
    x = _inputs(batch=num_tokens, length=1, seed=num_tokens)
    padding_mask = np.ones((num_tokens, 1), "int32")
    padding_mask[1] = 0
    moe = _make_layer(x, num_experts=num_experts, top_k=top_k, router_scale=3.0)
    assert_matches_reference(moe, x, padding_mask, False, num_groups=1, capacity=None)


def test_dropless_block_scan_on_many_tokens_matches_reference():
    # 1040 tokens over 4 experts: the block-sorted scan, blocks of 128 rows, the padded row's
    # blocks skipped.
    x = _inputs(batch=2, length=520, seed=3)
    padding_mask = np.ones((2, 520), "int32")
    padding_mask[1, 400:] = 0
    moe = _make_layer(x, router_scale=3.0)
    assert_matches_reference(moe, x, padding_mask, False, num_groups=1, capacity=None)


def test_dropless_path_is_chosen_by_size():
    def path(num_tokens, num_experts, top_k=2, quantize=None):
        moe = MoEFeedForward(num_experts=num_experts, intermediate_dim=4, top_k=top_k)
        moe.build((1, num_tokens, MODEL_DIM))
        if quantize:
            moe.expert_wi.quantize(quantize)
            moe.expert_wo.quantize(quantize)
        return moe._dropless_path(num_tokens)

    # 16 experts, top-2: buffers for 16 to 64 choices (T = 8 to 32).
    assert [path(t, 16) for t in (1, 7, 8, 16, 32, 33, 512)] == (
        ["blocks"] * 2 + ["buffers"] * 3 + ["blocks"] * 2
    )
    assert [path(t, 16, top_k=1) for t in (15, 16, 64, 65)] == [
        "blocks",
        "buffers",
        "buffers",
        "blocks",
    ]
    # 64 experts: the largest buffer is `E * T` rows, at most 4096.
    assert [path(t, 64) for t in (31, 32, 64, 65)] == ["blocks", "buffers", "buffers", "blocks"]
    assert path(16, 16, quantize="int8") == "blocks"


def _routed_inputs(choices, seed=0):
    """Inputs `[1, T, M]` and a router kernel that send token `t` to the experts `choices[t]`
    (first choice first): the first `E` features carry the choices, the rest are random."""
    num_tokens, num_experts = len(choices), NUM_EXPERTS
    x = np.random.default_rng(seed).normal(size=(1, num_tokens, MODEL_DIM)).astype("float32")
    x[0, :, :num_experts] = 0.0
    for token, experts in enumerate(choices):
        for rank, expert in enumerate(experts):
            x[0, token, expert] = 4.0 - rank
    router_kernel = np.zeros((MODEL_DIM, num_experts), "float32")
    router_kernel[:num_experts] = 3.0 * np.eye(num_experts)
    return x, router_kernel


@pytest.mark.parametrize(
    "choices",
    [
        # 2 tokens x 2 choices, one claim per expert: buffers of 1 row.
        [(0, 1), (2, 3)],
        # Expert 0 gets 3 claims: buffers of 4 rows (2 would drop one).
        [(0,), (0,), (0,), (1,), (2,), (3,), (1,), (2,)],
        # Expert 0 gets 5 of 6 first choices: buffers of 6 rows, the largest (T = 6).
        [(0, 1), (0, 2), (0, 3), (0, 1), (0, 2), (3, 2)],
    ],
)
def test_dropless_buffers_hold_the_busiest_experts_claims(choices):
    x, router_kernel = _routed_inputs(choices)
    moe = _make_layer(x, top_k=len(choices[0]))
    moe.router.kernel.assign(router_kernel)
    kept, _ = assert_matches_reference(moe, x, None, False, num_groups=1, capacity=None)
    assert kept.all()
    (_, routing), _ = run_layer(moe, x, return_routing=True)
    assert np.asarray(routing.instructions.expert_index)[0].tolist() == [
        list(experts) for experts in choices
    ]


@pytest.mark.parametrize(
    "dispatch, top_k", [("einsum", 2), ("sort", 2), ("sort", 1), ("sort_loop", 2), ("sort_loop", 1)]
)
def test_matches_reference_with_drops(dispatch, top_k):
    x = _inputs(batch=2, length=32)
    # A sharpened router and capacity_factor 1.0 (C = 8 per group of 32) force drops.
    moe = _make_layer(
        x, top_k=top_k, dispatch=dispatch, num_groups=2, capacity_factor=1.0, router_scale=4.0
    )
    kept, _ = assert_matches_reference(moe, x, None, True, num_groups=2, capacity=8)
    assert not kept[:, 0].all() and (top_k == 1 or not kept[:, 1].all())


def test_dispatch_modes_agree_with_drops_including_expert_inputs():
    x = _inputs(batch=2, length=32, seed=3)
    padding_mask = np.ones((2, 32), "int32")
    padding_mask[1, 20:] = 0
    cotangent = np.random.default_rng(1).normal(size=x.shape).astype("float32")
    weights = None
    results = {}
    for dispatch in ("einsum", "sort", "sort_loop"):
        moe = _make_layer(
            x, dispatch=dispatch, num_groups=4, capacity_factor=1.0, router_scale=4.0
        )
        weights = weights or moe.get_weights()
        moe.set_weights(weights)
        outputs, _, grads, input_grad = layer_outputs_and_grads(moe, x, cotangent, padding_mask)
        assert _np(moe.dropped_fraction)[0] > 0
        expert_inputs = None if dispatch == "sort_loop" else _expert_inputs(moe, x, padding_mask)
        results[dispatch] = (outputs, grads, input_grad, expert_inputs)
    outputs, grads, input_grad, expert_inputs = results["einsum"]
    sort_outputs, sort_grads, sort_input_grad, sort_expert_inputs = results["sort"]
    # [E, G, C, M] = [4, 4, C, 8] with C = expert_capacity(16, 4, 1.0) = 4.
    assert expert_inputs.shape == (4, 4, 4, MODEL_DIM)
    np.testing.assert_array_equal(sort_expert_inputs, expert_inputs)
    np.testing.assert_allclose(sort_outputs, outputs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sort_input_grad, input_grad, rtol=1e-5, atol=1e-6)
    for name in grads:
        np.testing.assert_allclose(sort_grads[name], grads[name], rtol=1e-5, atol=1e-6)
    # The expert loop packs each expert's rows across groups ([E, G * C, M]): same results.
    loop_outputs, loop_grads, loop_input_grad, _ = results["sort_loop"]
    np.testing.assert_allclose(loop_outputs, outputs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loop_input_grad, input_grad, rtol=1e-5, atol=1e-6)
    for name in grads:
        np.testing.assert_allclose(loop_grads[name], grads[name], rtol=1e-5, atol=1e-6)


def _expert_inputs(moe, x, padding_mask):
    """The `[E, G, C, M]` tensor that reaches `_constrain_expert_inputs` in a training call."""

    def call(trainable, non_trainable, x):
        captured = []
        moe._constrain_expert_inputs = lambda t: captured.append(t) or t
        moe.stateless_call(trainable, non_trainable, x, padding_mask=padding_mask, training=True)
        del moe._constrain_expert_inputs
        return captured[0]

    trainable = [v.value for v in moe.trainable_variables]
    non_trainable = [v.value for v in moe.non_trainable_variables]
    return _np(_compile_and_run(call, trainable, non_trainable, jnp.asarray(x)))


def _hand_worked_layer(dispatch):
    """Two experts, one group of 8 tokens, C = int(8 * 1.0 / 2) = 4, router = identity.

    Inputs are log-probabilities, so the router's softmax returns them exactly: tokens 0-5 prefer
    expert 0, tokens 6-7 prefer expert 1 (every token uses both experts with top-2).
    """
    probs = np.array([[0.8, 0.2]] * 6 + [[0.3, 0.7]] * 2, "float32")
    probs[:6, 0] += np.linspace(0.0, 0.1, 6)
    probs[:6, 1] = 1 - probs[:6, 0]
    x = np.log(probs)[None]
    moe = MoEFeedForward(
        num_experts=2, intermediate_dim=HIDDEN_DIM, capacity_factor=1.0, dispatch=dispatch
    )
    moe.build(x.shape)
    moe.router.kernel.assign(np.eye(2, dtype="float32"))
    return moe, x, probs


@pytest.mark.parametrize("dispatch", ["einsum", "sort", "sort_loop"])
def test_hand_worked_drops_and_statistics(dispatch):
    moe, x, probs = _hand_worked_layer(dispatch)
    (outputs, routing), losses = run_layer(moe, x, training=True, return_routing=True)
    outputs = _np(outputs)[0]
    wi, wo = _np(moe.expert_wi.kernel), _np(moe.expert_wo.kernel)

    def expert(e, t):
        return np.maximum(x[0, t] @ wi[e], 0) @ wo[e]

    # First choices: expert 0 keeps tokens 0-3 and drops 4, 5; expert 1 keeps 6, 7 (slots 0, 1).
    # Second choices on expert 1 start at slot 2: tokens 0, 1 fit, 2-5 are dropped; tokens 6, 7
    # would take expert 0's slots 4 and 5: dropped. Gates are never renormalised after a drop.
    expected = np.zeros((8, 2), "float32")
    for t in (0, 1):
        expected[t] = probs[t, 0] * expert(0, t) + probs[t, 1] * expert(1, t)
    for t in (2, 3):
        expected[t] = probs[t, 0] * expert(0, t)
    for t in (6, 7):
        expected[t] = probs[t, 1] * expert(1, t)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)
    assert not outputs[4:6].any()  # dropped by both choices: zero (only the residual remains)

    # Statistics of the training call: choices per expert before capacity and drop fractions.
    np.testing.assert_allclose(_np(moe.expert_load), [8, 8])
    np.testing.assert_allclose(_np(moe.dropped_fraction), [2 / 8, 6 / 8])
    np.testing.assert_allclose(_np(routing.metrics.dispatched_per_expert), [4, 4])
    # Aux loss: top-1 density [6, 2] / 8 against the mean router probabilities.
    expected_aux = 2**2 * np.mean(np.array([0.75, 0.25]) * probs.mean(axis=0))
    np.testing.assert_allclose(_np(losses[0]), 0.01 * expected_aux, rtol=1e-5)

    # Evaluation without capacity drops nothing and leaves the statistics alone.
    eval_outputs, _ = run_layer(moe, x)
    np.testing.assert_allclose(
        _np(eval_outputs)[0, 4], probs[4, 0] * expert(0, 4) + probs[4, 1] * expert(1, 4), rtol=1e-5
    )
    np.testing.assert_allclose(_np(moe.dropped_fraction), [2 / 8, 6 / 8])


@pytest.mark.parametrize("path", ["einsum", "sort", "sort_loop", "dropless"])
def test_experts_without_tokens_get_zero_gradients(path):
    x = _inputs(batch=4, length=16)
    x[..., 0] = 1.0
    moe = _make_layer(x, dispatch="sort" if path == "dropless" else path, capacity_factor=4.0)
    kernel = 0.01 * _np(moe.router.kernel)
    kernel[0] = [10.0, 9.0, -10.0, -10.0]  # the constant feature picks experts 0 and 1
    moe.router.kernel.assign(kernel)
    training = path != "dropless"
    _, grads = assert_matches_reference(
        moe, x, None, training, num_groups=1, capacity=64 if training else None
    )
    for name in ("expert_wi/kernel", "expert_wo/kernel"):
        grad = np.asarray(grads[name])
        assert np.isfinite(grad).all()
        assert not grad[2:].any(), name
        assert grad[:2].any()


@pytest.mark.parametrize("dispatch", ["einsum", "sort", "sort_loop"])
def test_padding_is_not_routed(dispatch):
    x = _inputs(batch=2, length=32, seed=5)
    padding_mask = np.ones((2, 32), "int32")
    padding_mask[0, :10] = 0  # padding first: it would claim slots before the real tokens
    padding_mask[1, 25:] = 0
    moe = _make_layer(x, dispatch=dispatch, capacity_factor=1.0, router_scale=4.0)
    kept, _ = assert_matches_reference(moe, x, padding_mask, True, num_groups=1, capacity=16)
    assert not kept.all()

    changed = x.copy()
    changed[padding_mask == 0] = 100.0
    (outputs, routing), losses = run_layer(
        moe, x, padding_mask, training=True, return_routing=True
    )
    (changed_outputs, _), changed_losses = run_layer(
        moe, changed, padding_mask, training=True, return_routing=True
    )
    np.testing.assert_array_equal(_np(changed_outputs), _np(outputs))
    np.testing.assert_array_equal(_np(changed_losses[0]), _np(losses[0]))
    assert not _np(outputs)[padding_mask == 0].any()
    dispatched = np.asarray(routing.instructions.dispatched).reshape(-1, 2)
    assert not dispatched[padding_mask.reshape(-1) == 0].any()


def test_padding_with_segment_ids_on_the_dropless_path():
    x = _inputs(batch=2, length=32, seed=6)
    segment_ids = np.array([[1] * 10 + [2] * 16 + [0] * 6, [3] * 32])
    moe = _make_layer(x)
    assert_matches_reference(moe, x, segment_ids, False, num_groups=1, capacity=None)
    outputs, _ = run_layer(moe, x, segment_ids)
    assert not _np(outputs)[segment_ids == 0].any()


def test_num_groups_sets_capacity_per_group():
    x = _inputs(batch=4, length=16)
    x[..., 0] = 1.0
    dispatched = {}
    for num_groups in (1, 8):
        moe = _make_layer(x, top_k=1, capacity_factor=1.0, num_groups=num_groups)
        kernel = np.zeros((MODEL_DIM, NUM_EXPERTS), "float32")
        kernel[0, 0] = 5.0  # every token's first choice is expert 0
        moe.router.kernel.assign(kernel)
        (_, routing), _ = run_layer(moe, x, training=True, return_routing=True)
        dispatched[num_groups] = _np(routing.metrics.dispatched_per_expert)[0]
        assert routing.instructions.expert_index.shape == (num_groups, 64 // num_groups, 1)
    # One group of 64: C = 16. Eight groups of 8: C = max(int(8 / 4), 4) = 4 each, 32 in all.
    assert (expert_capacity(64, 4, 1.0), expert_capacity(8, 4, 1.0)) == (16, 4)
    assert dispatched == {1: 16.0, 8: 32.0}


def test_indivisible_groups_and_bad_arguments_raise():
    x = _inputs(batch=2, length=5)
    moe = _make_layer(x, num_groups=3)
    with pytest.raises(ValueError, match="num_groups=3"):
        run_layer(moe, x, training=True)
    run_layer(moe, x)  # routing without capacity does not use groups
    with pytest.raises(ValueError, match="dispatch"):
        MoEFeedForward(num_experts=4, intermediate_dim=8, dispatch="dense")
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEFeedForward(num_experts=4, intermediate_dim=8, capacity_factor=0)
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(num_experts=4, intermediate_dim=8, top_k=5)


def test_eval_capacity_factor_uses_capacity_at_evaluation():
    x = _inputs(batch=2, length=32)
    moe = _make_layer(x, eval_capacity_factor=1.0, router_scale=4.0, num_groups=2)
    assert_matches_reference(moe, x, None, False, num_groups=2, capacity=8)


def test_weight_names_shapes_and_initialisers():
    moe = MoEFeedForward(num_experts=8, intermediate_dim=512, name="moe")
    moe.build((None, None, 128))
    shapes = {v.path: tuple(v.shape) for v in moe.weights}
    assert shapes == {
        "moe/router/kernel": (128, 8),
        "moe/expert_wi/kernel": (8, 128, 512),
        "moe/expert_wo/kernel": (8, 512, 128),
        "moe/expert_load": (8,),
        "moe/dropped_fraction": (2,),
    }
    assert {v.path for v in moe.trainable_weights} == {
        "moe/router/kernel",
        "moe/expert_wi/kernel",
        "moe/expert_wo/kernel",
    }
    # GShard fan-in uniform initialisation: std M^-1/2 for Wi and router, H^-1/2 for Wo.
    for kernel, fan_in in ((moe.expert_wi.kernel, 128), (moe.expert_wo.kernel, 512)):
        values = _np(kernel)
        assert np.abs(values).max() <= np.sqrt(3 / fan_in)
        np.testing.assert_allclose(values.std(), fan_in**-0.5, rtol=0.02)
    np.testing.assert_allclose(_np(moe.router.kernel).std(), 128**-0.5, rtol=0.1)


def test_serialization_round_trip(tmp_path):
    x = _inputs(batch=2, length=32)
    inputs = keras.Input(shape=(32, MODEL_DIM))
    moe = MoEFeedForward(
        num_experts=NUM_EXPERTS,
        intermediate_dim=HIDDEN_DIM,
        top_k=1,
        capacity_factor=1.5,
        eval_capacity_factor=3.0,
        num_groups=2,
        dispatch="einsum",
        activation="gelu",
        aux_loss_weight=0.05,
        name="moe",
    )
    model = keras.Model(inputs, moe(inputs))
    config = moe.get_config()
    restored = MoEFeedForward.from_config(config)
    assert restored.get_config() == config
    path = tmp_path / "moe.keras"
    model.save(path)
    loaded = keras.models.load_model(path).get_layer("moe")
    assert loaded.get_config() == config
    assert [v.path for v in loaded.weights] == [v.path for v in moe.weights]
    for loaded_weight, weight in zip(loaded.get_weights(), moe.get_weights()):
        np.testing.assert_array_equal(loaded_weight, weight)
    expected, _ = run_layer(moe, x, training=True)
    actual, _ = run_layer(loaded, x, training=True)
    np.testing.assert_array_equal(_np(actual), _np(expected))


# Over 4 experts (top-2), 8 tokens take the dropless capacity buffers; 1 token and 64 tokens the
# block scan (`test_dropless_path_is_chosen_by_size` checks the choice).
DROPLESS_PATHS = pytest.mark.parametrize(
    "batch, length", [(2, 4), (1, 1), (2, 32)], ids=["buffers", "blocks_of_1", "blocks_of_8"]
)


@DROPLESS_PATHS
def test_mixed_bfloat16_routes_in_float32(batch, length):
    # Inputs exact in bfloat16, so both layers route the same float32 values: a near tie
    # between experts cannot flip with the input's rounding.
    x = np.asarray(jnp.asarray(_inputs(batch=batch, length=length), jnp.bfloat16), np.float32)
    reference = _make_layer(x)
    keras.config.set_dtype_policy("mixed_bfloat16")
    moe = _make_layer(x)
    moe.set_weights(reference.get_weights())
    (outputs, routing), losses = run_layer(moe, x, training=True, return_routing=True)
    expected = _np(run_layer(reference, x, training=True)[0])
    np.testing.assert_allclose(_np(outputs), expected, atol=0.03 * np.abs(expected).max())
    assert outputs.dtype == "bfloat16"
    assert moe.router.kernel.dtype == "float32" and moe.router.compute_dtype == "float32"
    assert moe.expert_wi.kernel.dtype == "float32" and moe.expert_wi.compute_dtype == "bfloat16"
    assert routing.router_probs.dtype == "float32"
    assert routing.instructions.combine_weights.dtype == "float32"
    assert losses[0].dtype == "float32"
    expected = _np(run_layer(reference, x)[0])
    dropless = run_layer(moe, x)[0]
    assert dropless.dtype == "bfloat16"
    np.testing.assert_allclose(_np(dropless), expected, atol=0.03 * np.abs(expected).max())


def _model_with_moe(x, **kwargs):
    inputs = keras.Input(shape=x.shape[1:])
    moe = MoEFeedForward(
        num_experts=NUM_EXPERTS, intermediate_dim=HIDDEN_DIM, name="moe", **kwargs
    )
    return keras.Model(inputs, moe(inputs)), moe


def _relative_error(actual, expected):
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def _enable_random_lora(moe, rank=2):
    for layer in (moe.expert_wi, moe.expert_wo):
        layer.enable_lora(rank)
        shape = layer.lora_kernel_b.shape
        layer.lora_kernel_b.assign(np.random.normal(scale=0.3, size=shape).astype("float32"))


def test_int8_then_lora_on_experts_only_and_dropless_agrees():
    x = _inputs(batch=2, length=32)
    model, moe = _model_with_moe(x, capacity_factor=4.0)
    router_kernel = _np(moe.router.kernel)
    float_outputs = _np(run_layer(moe, x)[0])
    model.quantize("int8")
    assert moe.expert_wi.quantization_mode == "int8"
    assert moe.expert_wi.kernel.dtype == "int8" and moe.expert_wo.kernel.dtype == "int8"
    assert moe.router.kernel.dtype == "float32"
    np.testing.assert_array_equal(_np(moe.router.kernel), router_kernel)
    dropless = _np(run_layer(moe, x)[0])
    assert _relative_error(dropless, float_outputs) < 0.03
    np.testing.assert_allclose(dropless, _np(run_layer(moe, x, training=True)[0]), atol=1e-5)

    _enable_random_lora(moe)  # QLoRA: LoRA on the int8 experts
    assert [v.path for v in moe.router.weights] == ["moe/router/kernel"]
    lora_dropless = _np(run_layer(moe, x)[0])
    assert _relative_error(lora_dropless, dropless) > 0.05
    lora_capacity = _np(run_layer(moe, x, training=True)[0])
    np.testing.assert_allclose(lora_dropless, lora_capacity, rtol=1e-5, atol=1e-5)


@DROPLESS_PATHS
def test_lora_applies_to_experts_only_and_dropless_agrees(batch, length):
    x = _inputs(batch=batch, length=length)
    model, moe = _model_with_moe(x, capacity_factor=4.0)
    before = _np(run_layer(moe, x)[0])
    _enable_random_lora(moe)
    assert [v.path for v in moe.router.weights] == ["moe/router/kernel"]
    assert moe.router.kernel.trainable
    assert {v.path for v in moe.expert_wi.trainable_weights} == {
        "moe/expert_wi/lora_kernel_a",
        "moe/expert_wi/lora_kernel_b",
    }
    dropless = _np(run_layer(moe, x)[0])
    capacity = _np(run_layer(moe, x, training=True)[0])
    assert _relative_error(dropless, before) > 0.05  # LoRA changed the experts
    np.testing.assert_allclose(dropless, capacity, rtol=1e-5, atol=1e-5)
