"""GLaMAdafactor against an independent NumPy Adafactor, Keras' Adafactor, and the JAX API."""

import contextlib
import json

import jax
import keras
import numpy as np
import pytest

from keras_glam.optimizers import GLaMAdafactor, GLaMLearningRateSchedule
from keras_glam.optimizers.adafactor import GLAM_ATTENTION_AXIS_GROUPS

# shape -> the axes GLaM's rule factors over (largest, second largest), worked out by hand.
SHAPES_AND_FACTORED_AXES = {
    (256, 128): (0, 1),
    (64, 8): None,  # second largest axis < 128
    (4, 128, 256): (2, 1),  # an [E, M, H] expert kernel: M and H, not E
    (256, 128, 3): (0, 1),  # factored axes not trailing: normalised over axis 1, not Lingvo's -1
    (3,): None,
    (): None,
}
NUM_STEPS = 6
# Step 3's gradients are 30x larger so that the update clipping triggers.
GRADIENT_SCALES = [1.0, 0.5, 30.0, 1.0, 0.1, 2.0]


def _rms(x):
    return np.sqrt(np.mean(np.square(x)))


def _reference_adafactor(
    initial_weight,
    gradients,
    factored_axes,
    learning_rate,
    beta_1=None,
    decay_exponent=0.8,
    clip_threshold=1.0,
    multiply_by_parameter_scale=True,
    epsilon_1=1e-30,
    epsilon_2=1e-3,
):
    """Weights after each step, and the second-moment slots after the last, in float64,
    written from the Adafactor paper's Algorithm 4.

    The factored estimate uses keepdims means: `R` (mean over the largest axis) and `C` (mean
    over the second largest) broadcast against each other, `v = R * C / mean(R)`. The slots
    are `[v]` unfactored, else `[R, C]` without their reduced axes.
    """
    weight = initial_weight.astype(np.float64)
    second_moment = np.zeros_like(weight)
    row = column = None
    momentum = np.zeros_like(weight)
    history = []
    for t, gradient in enumerate(gradients, start=1):
        gradient = gradient.astype(np.float64)
        decay = 1.0 - t ** (-decay_exponent)
        squared = gradient**2 + epsilon_1
        if factored_axes is None:
            second_moment = decay * second_moment + (1 - decay) * squared
            estimate = second_moment
        else:
            largest, second = factored_axes
            new_row = squared.mean(axis=largest, keepdims=True)
            new_column = squared.mean(axis=second, keepdims=True)
            row = new_row if row is None else decay * row + (1 - decay) * new_row
            column = new_column if column is None else decay * column + (1 - decay) * new_column
            estimate = row * column / row.mean(axis=second, keepdims=True)
        update = gradient / np.sqrt(estimate)
        if clip_threshold is not None:
            update = update / max(1.0, _rms(update) / clip_threshold)
        step = learning_rate(t - 1) * update
        if multiply_by_parameter_scale:
            step = step * max(_rms(weight), epsilon_2)
        if beta_1:
            momentum = beta_1 * momentum + (1 - beta_1) * step
            step = momentum
        weight = weight - step
        history.append(weight)
    if factored_axes is None:
        return history, [second_moment]
    return history, [row.squeeze(axis=largest), column.squeeze(axis=second)]


def _weight_and_gradients(rng, shape):
    weight = rng.normal(size=shape).astype("float32")
    gradients = [(scale * rng.normal(size=shape)).astype("float32") for scale in GRADIENT_SCALES]
    return weight, gradients


def _problem(seed=0):
    """Initial weights and per-step gradients of every shape in SHAPES_AND_FACTORED_AXES."""
    rng = np.random.default_rng(seed)
    weights, gradients = zip(*(_weight_and_gradients(rng, s) for s in SHAPES_AND_FACTORED_AXES))
    return list(weights), list(gradients)


def _run_stateful(optimizer, weights, gradients):
    variables = [keras.Variable(w, name=f"w{i}") for i, w in enumerate(weights)]
    history = []
    for step in range(NUM_STEPS):
        optimizer.apply([g[step] for g in gradients], variables)
        history.append([np.asarray(v.value) for v in variables])
    return history, variables


def _assert_matches_reference(history, weights, gradients, learning_rate, **options):
    for index, (shape, axes) in enumerate(SHAPES_AND_FACTORED_AXES.items()):
        expected, _ = _reference_adafactor(
            weights[index], gradients[index], axes, learning_rate, **options
        )
        for step in range(NUM_STEPS):
            # Compare the accumulated change, not the weights, so that the test is sensitive.
            np.testing.assert_allclose(
                history[step][index] - weights[index],
                expected[step] - weights[index],
                rtol=2e-4,
                atol=2e-6,
                err_msg=f"shape {shape}, step {step}",
            )


OPTIONS = {
    "glam": {},
    "momentum_no_clip_absolute_lr": {
        "beta_1": 0.9,
        "clip_threshold": None,
        "multiply_by_parameter_scale": False,
    },
    "faster_decay_tight_clip": {"decay_exponent": 0.5, "clip_threshold": 0.5, "epsilon_2": 2.0},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_matches_numpy_reference(options):
    weights, gradients = _problem()
    optimizer = GLaMAdafactor(learning_rate=0.05, **options)
    history, _ = _run_stateful(optimizer, weights, gradients)
    _assert_matches_reference(history, weights, gradients, lambda step: 0.05, **options)


def test_default_learning_rate_is_glam_schedule():
    weights, gradients = _problem(seed=1)
    optimizer = GLaMAdafactor()
    assert isinstance(optimizer._learning_rate, GLaMLearningRateSchedule)
    history, _ = _run_stateful(optimizer, weights, gradients)
    _assert_matches_reference(history, weights, gradients, lambda step: 1 / np.sqrt(10000))


def test_jax_stateless_apply_under_jit_matches_reference():
    weights, gradients = _problem(seed=2)
    optimizer = GLaMAdafactor(learning_rate=0.05)
    variables = [keras.Variable(w, name=f"w{i}") for i, w in enumerate(weights)]
    optimizer.build(variables)
    optimizer_values = [v.value for v in optimizer.variables]
    trainable_values = [v.value for v in variables]
    stateless_apply = jax.jit(optimizer.stateless_apply)
    history = []
    for step in range(NUM_STEPS):
        trainable_values, optimizer_values = stateless_apply(
            optimizer_values, [g[step] for g in gradients], trainable_values
        )
        history.append([np.asarray(v) for v in trainable_values])
    _assert_matches_reference(history, weights, gradients, lambda step: 0.05)
    # Stateless: the variables themselves never moved.
    for variable, weight in zip(variables, weights):
        np.testing.assert_array_equal(variable.numpy(), weight)


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((2048, 64), None),  # router [M, E] with E < 128
        ((2048, 256), (0, 1)),  # router with 256 experts
        ((16, 32), None),  # relative-bias table [N, 32]
        ((64, 2048, 8192), (2, 1)),  # expert_wi [E, M, H]
        ((64, 8192, 2048), (1, 2)),  # expert_wo [E, H, M]
        ((128, 128), (0, 1)),  # ties go to the lower axis
        ((8192, 128, 128), (0, 1)),
        ((127, 4096), None),
        ((4096,), None),
        ((), None),
    ],
)
def test_factored_dims_rule(shape, expected):
    assert GLaMAdafactor().factored_dims(shape) == expected


def test_factoring_options():
    assert GLaMAdafactor(factored=False).factored_dims((4096, 4096)) is None
    assert GLaMAdafactor(min_dim_size_to_factor=8).factored_dims((64, 8)) == (0, 1)
    assert GLaMAdafactor(min_dim_size_to_factor=9).factored_dims((64, 8)) is None


# An attention kernel in KerasHub's layout, the 2-D matrix GLaM stores for it (Lingvo and praxis
# `attention_combine_dims=True`), and the axes GLaM's rule factors that matrix over.
ATTENTION_KERNELS = {
    # Per axis, these three kept a full second moment (they have an axis < 128) ...
    "query": ("decoder_block_0/attention/query/kernel", (256, 4, 64), (256, 256), (0, 1)),
    "value_wide": ("attention/value/kernel", (128, 4, 64), (128, 256), (1, 0)),
    "output": (
        "decoder_block_3/attention/attention_output/kernel", (4, 64, 128), (256, 128), (0, 1)
    ),
    # ... and this one was factored over axes 0 and 2: separately for each head.
    "key_per_head": ("attention/key/kernel", (256, 2, 128), (256, 256), (0, 1)),
}


def _variable_at(path, value):
    """A variable whose `path` is `path`, as a layer nested in `path`'s scopes would make."""
    *scopes, name = path.split("/")
    with contextlib.ExitStack() as stack:
        for scope in scopes:
            stack.enter_context(keras.name_scope(scope))
        return keras.Variable(value, name=name)


def _second_moment_slots(optimizer):
    return [v.numpy() for v in optimizer.variables if "second_moment" in v.path]


@pytest.mark.parametrize(
    "path, shape, matrix_shape, matrix_axes",
    ATTENTION_KERNELS.values(),
    ids=ATTENTION_KERNELS.keys(),
)
def test_attention_kernel_statistics_are_those_of_glams_matrix(
    path, shape, matrix_shape, matrix_axes
):
    weight, gradients = _weight_and_gradients(np.random.default_rng(8), shape)
    variable = _variable_at(path, weight)
    optimizer = GLaMAdafactor(learning_rate=0.05)
    # The same numbers as GLaM's matrix, through the same optimizer (no grouping applies).
    matrix = keras.Variable(weight.reshape(matrix_shape), name="matrix")
    matrix_optimizer = GLaMAdafactor(learning_rate=0.05)
    expected, expected_slots = _reference_adafactor(
        weight.reshape(matrix_shape),
        [gradient.reshape(matrix_shape) for gradient in gradients],
        matrix_axes,
        lambda step: 0.05,
    )
    initial = weight.reshape(matrix_shape)
    for step, gradient in enumerate(gradients):
        optimizer.apply([gradient], [variable])
        matrix_optimizer.apply([gradient.reshape(matrix_shape)], [matrix])
        change = variable.numpy().reshape(matrix_shape) - initial
        np.testing.assert_allclose(
            change, expected[step] - initial, rtol=2e-4, atol=2e-6, err_msg=f"step {step}"
        )
        # Equal up to the rounding of the weights themselves (|W| < 5: an ulp is < 5e-7).
        np.testing.assert_allclose(
            change, matrix.numpy() - initial, rtol=1e-5, atol=1e-6, err_msg=f"step {step}"
        )
    slots = _second_moment_slots(optimizer)
    assert [slot.size for slot in slots] == [slot.size for slot in expected_slots]
    for slot, matrix_slot, expected_slot in zip(
        slots, _second_moment_slots(matrix_optimizer), expected_slots
    ):
        np.testing.assert_allclose(slot.reshape(-1), expected_slot.reshape(-1), rtol=1e-5)
        np.testing.assert_allclose(slot.reshape(-1), matrix_slot.reshape(-1), rtol=1e-6)


@pytest.mark.parametrize(
    "path, shape, expected",
    [
        # glam_small_16e: [M, N, Dh] = [256, 4, 64] is GLaM's [256, 256]; ties go to M.
        ("decoder_block_0/attention/query/kernel", (256, 4, 64), ((0,), (1, 2))),
        ("glam_backbone/decoder_block_1/attention/key/kernel", (256, 4, 64), ((0,), (1, 2))),
        ("value/kernel", (256, 4, 64), ((0,), (1, 2))),
        ("decoder_block_0/attention/attention_output/kernel", (4, 64, 256), ((0, 1), (2,))),
        # glam_64b_64e: N * Dh = 16384 > M = 8192.
        ("decoder_block_0/attention/query/kernel", (8192, 128, 128), ((1, 2), (0,))),
        ("decoder_block_0/attention/attention_output/kernel", (128, 128, 8192), ((0, 1), (2,))),
        # glam_tiny: [64, 2, 32] is GLaM's [64, 64], not factored.
        ("decoder_block_0/attention/query/kernel", (64, 2, 32), None),
        # Expert kernels stay 3-D, as in Lingvo and praxis: M and H, per expert.
        ("decoder_block_0/moe/expert_wi/kernel", (64, 2048, 8192), ((2,), (1,))),
        ("decoder_block_0/moe/expert_wo/kernel", (64, 8192, 2048), ((1,), (2,))),
        ("decoder_block_0/moe/router/kernel", (2048, 64), None),
        # A 2-D kernel named like an attention projection is not regrouped.
        ("dense/query/kernel", (256, 512), ((1,), (0,))),
        ("attention/query_norm/kernel", (256, 4, 128), ((0,), (2,))),
    ],
)
def test_factored_axes_on_glams_view(path, shape, expected):
    assert GLaMAdafactor().factored_axes(path, shape) == expected


def test_axis_groups_are_configurable():
    path, shape = "attention/key/kernel", (256, 2, 128)
    assert GLaMAdafactor(axis_groups={}).factored_axes(path, shape) == ((0,), (2,))
    custom = GLaMAdafactor(axis_groups={r".*key/kernel": ((0, 1), (2,))})
    assert custom.variable_axis_groups(path, shape) == ((0, 1), (2,))
    assert custom.factored_axes(path, shape) == ((0, 1), (2,))
    # The default applies to query/value only through its own patterns, not the custom ones.
    assert custom.variable_axis_groups("attention/query/kernel", shape) == ((0,), (1,), (2,))
    assert GLaMAdafactor().axis_groups == GLAM_ATTENTION_AXIS_GROUPS

    class PerHead(GLaMAdafactor):
        def variable_axis_groups(self, path, shape):
            return tuple((axis,) for axis in range(len(shape)))

    assert PerHead().factored_axes(path, shape) == ((0,), (2,))


def test_grouped_slot_shapes_and_layouts_under_model_parallel():
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), jax.devices()[:1])
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*query/kernel"] = ("batch", "model", None)
    layout_map[".*attention_output/kernel"] = ("model", None, "batch")
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    with distribution.scope():
        query = _variable_at("attention/query/kernel", np.zeros((256, 4, 64), "float32"))
        output = _variable_at(
            "attention/attention_output/kernel", np.zeros((4, 64, 128), "float32")
        )
        optimizer = GLaMAdafactor()
        optimizer.build([query, output])
        optimizer.apply(
            [np.ones((256, 4, 64), "float32"), np.ones((4, 64, 128), "float32")],
            [query, output],
        )
    slots = {
        v.path: (tuple(v.shape), v._layout.axes)
        for v in optimizer.variables
        if "second_moment" in v.path
    }
    assert slots == {
        "glam_adafactor/attention_query_kernel_second_moment_mean_over_axis_0": (
            (4, 64),
            ("model", None),
        ),
        "glam_adafactor/attention_query_kernel_second_moment_mean_over_axes_1_2": (
            (256,),
            ("batch",),
        ),
        "glam_adafactor/attention_attention_output_kernel_second_moment_mean_over_axes_0_1": (
            (128,),
            ("batch",),
        ),
        "glam_adafactor/attention_attention_output_kernel_second_moment_mean_over_axis_2": (
            (4, 64),
            ("model", None),
        ),
    }


def test_slot_shapes_and_dtypes():
    weights, _ = _problem()
    variables = [keras.Variable(w, name=f"w{i}") for i, w in enumerate(weights)]
    optimizer = GLaMAdafactor(beta_1=0.5)
    optimizer.build(variables)
    slot_shapes = {
        v.path: tuple(v.shape) for v in optimizer.variables if v.path != "glam_adafactor/iteration"
    }
    assert slot_shapes == {
        "glam_adafactor/w0_second_moment_mean_over_axis_0": (128,),
        "glam_adafactor/w0_second_moment_mean_over_axis_1": (256,),
        "glam_adafactor/w0_momentum": (256, 128),
        "glam_adafactor/w1_second_moment": (64, 8),
        "glam_adafactor/w1_momentum": (64, 8),
        "glam_adafactor/w2_second_moment_mean_over_axis_2": (4, 128),
        "glam_adafactor/w2_second_moment_mean_over_axis_1": (4, 256),
        "glam_adafactor/w2_momentum": (4, 128, 256),
        "glam_adafactor/w3_second_moment_mean_over_axis_0": (128, 3),
        "glam_adafactor/w3_second_moment_mean_over_axis_1": (256, 3),
        "glam_adafactor/w3_momentum": (256, 128, 3),
        "glam_adafactor/w4_second_moment": (3,),
        "glam_adafactor/w4_momentum": (3,),
        "glam_adafactor/w5_second_moment": (),
        "glam_adafactor/w5_momentum": (),
    }
    assert all(v.dtype == "float32" for v in optimizer.variables[1:])
    # No momentum slots without beta_1 (GLaM).
    plain = GLaMAdafactor()
    plain.build(variables)
    assert not any("momentum" in v.path for v in plain.variables)


def _run_keras_and_glam(shape, steps=5):
    rng = np.random.default_rng(3)
    weight = rng.normal(size=shape).astype("float32")
    gradients = [rng.normal(size=shape).astype("float32") for _ in range(steps)]
    results = []
    for optimizer in (
        keras.optimizers.Adafactor(learning_rate=0.01),
        GLaMAdafactor(learning_rate=0.01),
    ):
        variable = keras.Variable(weight)
        for gradient in gradients:
            optimizer.apply([gradient], [variable])
        results.append(variable.numpy() - weight)
    return results, weight, gradients


@pytest.mark.parametrize("shape", [(256, 128), (4, 128, 256), (3,)])
def test_agrees_with_keras_adafactor_when_factoring_rules_agree(shape):
    # Keras factors the last two axes; here these are also the two largest and both >= 128
    # (or the variable is 1-D). With a constant rate below 1/sqrt(t), Keras' cap is inactive.
    (keras_change, glam_change), _, _ = _run_keras_and_glam(shape)
    np.testing.assert_allclose(glam_change, keras_change, rtol=1e-4, atol=1e-6)


def test_differs_from_keras_adafactor_on_small_matrices():
    # Keras factors a [64, 8] matrix; GLaM keeps its full second moment (8 < 128).
    (keras_change, glam_change), weight, gradients = _run_keras_and_glam((64, 8))
    unfactored = _reference_adafactor(weight, gradients, None, lambda step: 0.01)[0][-1] - weight
    factored = _reference_adafactor(weight, gradients, (0, 1), lambda step: 0.01)[0][-1] - weight
    np.testing.assert_allclose(glam_change, unfactored, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(keras_change, factored, rtol=1e-4, atol=1e-6)
    assert np.max(np.abs(glam_change - keras_change)) > 0.1 * np.max(np.abs(glam_change))


def test_factored_state_is_small_unlike_keras_adafactor():
    # Keras' Adafactor also keeps a full-size "velocity" for every variable, factored or not.
    variable = keras.Variable(np.zeros((4, 128, 256), "float32"))
    sizes = []
    for optimizer in (keras.optimizers.Adafactor(), GLaMAdafactor()):
        optimizer.build([variable])
        sizes.append(sum(int(np.prod(v.shape)) for v in optimizer.variables[1:]))
    keras_size, glam_size = sizes
    assert glam_size == 4 * 128 + 4 * 256
    assert keras_size >= 4 * 128 * 256


def test_mixed_bfloat16_training_keeps_float32_state():
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = keras.Sequential(
        [keras.Input((128,)), keras.layers.Dense(256, name="up"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=GLaMAdafactor(learning_rate=0.05), loss="mse")
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 128)).astype("float32")
    y = x[:, :1]
    kernel_before = model.get_layer("up").kernel.numpy().copy()
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert model.get_layer("up").kernel.dtype == "float32"
    assert not np.allclose(model.get_layer("up").kernel.numpy(), kernel_before)
    assert all(v.dtype == "float32" for v in model.optimizer.variables[1:])
    # The [128, 256] kernel is factored, the [256, 1] one is not.
    slot_names = [v.path for v in model.optimizer.variables]
    assert "glam_adafactor/sequential_up_kernel_second_moment_mean_over_axis_1" in slot_names
    assert "glam_adafactor/sequential_dense_kernel_second_moment" in slot_names


def test_bfloat16_variable_is_updated_from_float32_statistics():
    rng = np.random.default_rng(5)
    weight = rng.normal(size=(256, 128)).astype("float32")
    gradient = rng.normal(size=(256, 128)).astype("float32")
    variable = keras.Variable(weight, dtype="bfloat16")
    GLaMAdafactor(learning_rate=0.05).apply([gradient], [variable])
    rounded = np.asarray(keras.ops.cast(keras.ops.cast(weight, "bfloat16"), "float32"))
    expected = _reference_adafactor(rounded, [gradient], (0, 1), lambda step: 0.05)[0][0]
    actual = np.asarray(keras.ops.cast(variable.value, "float32"))
    np.testing.assert_allclose(actual, expected, rtol=1e-2, atol=1e-2)


def test_serialization_round_trip():
    optimizer = GLaMAdafactor(
        learning_rate=GLaMLearningRateSchedule(warmup_steps=5, multiplier=2.0),
        beta_1=0.9,
        decay_exponent=0.7,
        clip_threshold=None,
        multiply_by_parameter_scale=False,
        epsilon_1=1e-20,
        epsilon_2=1e-2,
        factored=False,
        min_dim_size_to_factor=64,
        axis_groups={r".*/query/kernel": ((0,), (1, 2))},
        weight_decay=0.01,
        global_clipnorm=1.0,
        name="opt",
    )
    config = optimizer.get_config()
    as_json = json.loads(json.dumps(keras.optimizers.serialize(optimizer)))  # tuples -> lists
    restored = keras.optimizers.deserialize(as_json)
    assert isinstance(restored, GLaMAdafactor)
    assert restored.get_config() == config
    assert restored.variable_axis_groups("a/query/kernel", (64, 4, 16)) == ((0,), (1, 2))
    assert isinstance(restored._learning_rate, GLaMLearningRateSchedule)
    assert float(restored._learning_rate(100)) == pytest.approx(2.0 / 10.0)


def test_saved_model_restores_optimizer_state(tmp_path):
    model = keras.Sequential([keras.Input((128,)), keras.layers.Dense(128)])
    model.compile(optimizer=GLaMAdafactor(), loss="mse")
    x = np.random.default_rng(6).normal(size=(8, 128)).astype("float32")
    model.fit(x, x, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.optimizer, GLaMAdafactor)
    assert len(restored.optimizer.variables) == len(model.optimizer.variables) == 4
    for original, loaded in zip(model.optimizer.variables, restored.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(original.value), np.asarray(loaded.value))


def test_slots_follow_the_variable_layout_under_model_parallel():
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), jax.devices()[:1])
    layout_map = keras.distribution.LayoutMap(mesh)
    # This key also fullmatches the slots' paths: they must not inherit its 3-D layout.
    layout_map[".*expert_wi.*"] = ("model", None, "batch")
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    with distribution.scope():
        expert_wi = keras.Variable(np.zeros((4, 128, 256), "float32"), name="expert_wi")
        optimizer = GLaMAdafactor()
        optimizer.build([expert_wi])
        optimizer.apply([np.ones((4, 128, 256), "float32")], [expert_wi])
    layouts = {v.path: v._layout.axes for v in optimizer.variables[1:]}
    assert layouts == {
        "glam_adafactor/expert_wi_second_moment_mean_over_axis_2": ("model", None),
        "glam_adafactor/expert_wi_second_moment_mean_over_axis_1": ("model", "batch"),
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta_1": 1.0}, "beta_1"),
        ({"decay_exponent": 0.0}, "decay_exponent"),
        ({"decay_exponent": 1.5}, "decay_exponent"),
        ({"clip_threshold": 0.0}, "clip_threshold"),
        ({"epsilon_1": -1.0}, "epsilon_1"),
        ({"min_dim_size_to_factor": 0}, "min_dim_size_to_factor"),
        ({"min_dim_size_to_factor": 12.5}, "min_dim_size_to_factor"),
        ({"axis_groups": [("query", ((0,), (1, 2)))]}, "must be a dict"),
        ({"axis_groups": {"query[": ((0,), (1, 2))}}, r"axis_groups\['query\['\]"),
        ({"axis_groups": {"query": ((0,), (2, 1))}}, "every axis once, in order"),
        ({"axis_groups": {"query": ((0,), ())}}, "non-empty"),
        ({"axis_groups": {"query": ((0,), ("x",))}}, "tuples of tuples of axes"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GLaMAdafactor(**kwargs)
