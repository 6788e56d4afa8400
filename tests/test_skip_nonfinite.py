"""Steps with non-finite gradients change nothing but the skip counter, whatever the optimizer."""

import keras
import numpy as np
import pytest

from keras_glam.models.glam_backbone import GLaMBackbone
from keras_glam.models.glam_causal_lm import GLaMCausalLM
from keras_glam.training.callbacks import TrainingProgress
from keras_glam.optimizers.skip_nonfinite import SkipNonFiniteSteps
from keras_glam.optimizers.skip_nonfinite import global_gradient_norm


def _dense_model(optimizer):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=optimizer, loss="mse")
    return model


def _state(model):
    """Trainable weights and optimizer variables, except the skip counter itself.

    (Non-trainable MoE routing statistics describe the last forward pass, skipped or not.)
    """
    optimizer_variables = [
        v for v in model.optimizer.variables if v is not model.optimizer.skipped_steps
    ]
    return [np.array(v.numpy()) for v in model.trainable_weights + optimizer_variables]


def _assert_bit_identical(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


GOOD_X = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]], "float32")
GOOD_Y = np.array([[1.0], [-1.0]], "float32")
NAN_X = np.array([[0.5, np.nan, 2.0], [1.0, 0.0, -0.5]], "float32")


@pytest.mark.parametrize(
    "make_inner",
    [
        lambda: keras.optimizers.Adam(0.01),
        lambda: keras.optimizers.SGD(0.1, momentum=0.9),
        lambda: keras.optimizers.Adafactor(0.01),
    ],
    ids=["adam", "sgd_momentum", "adafactor"],
)
def test_skipped_step_is_bit_identical_and_as_if_never_seen(make_inner):
    keras.utils.set_random_seed(0)
    model = _dense_model(SkipNonFiniteSteps(make_inner()))
    keras.utils.set_random_seed(0)
    reference = _dense_model(make_inner())

    for trained in (model, reference):
        trained.train_on_batch(GOOD_X, GOOD_Y)
    before = _state(model)
    model.train_on_batch(NAN_X, GOOD_Y)
    _assert_bit_identical(before, _state(model))
    assert int(model.optimizer.skipped_steps.numpy()) == 1
    assert int(model.optimizer.iterations.numpy()) == 1

    # The next good step continues exactly like an optimizer that never saw the bad batch.
    model.train_on_batch(GOOD_X, GOOD_Y)
    reference.train_on_batch(GOOD_X, GOOD_Y)
    for ours, theirs in zip(model.weights, reference.weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def test_overflowing_gradient_norm_is_skipped():
    model = _dense_model(SkipNonFiniteSteps(keras.optimizers.SGD(0.1)))
    model.train_on_batch(GOOD_X, GOOD_Y)
    before = _state(model)
    model.train_on_batch(GOOD_X, np.full((2, 1), 1e30, "float32"))  # Gradients ~1e30: norm inf.
    _assert_bit_identical(before, _state(model))
    assert int(model.optimizer.skipped_steps.numpy()) == 1


def test_max_gradient_norm_skips_large_finite_steps():
    model = _dense_model(SkipNonFiniteSteps(keras.optimizers.SGD(0.1), max_gradient_norm=1e-3))
    model.optimizer.build(model.trainable_variables)
    before = _state(model)
    model.train_on_batch(GOOD_X, GOOD_Y)
    _assert_bit_identical(before, _state(model))
    assert int(model.optimizer.skipped_steps.numpy()) == 1


def test_stateful_apply_skips_too():
    variable = keras.Variable(np.array([1.0, 2.0], "float32"))
    optimizer = SkipNonFiniteSteps(keras.optimizers.Adam(0.1))
    optimizer.apply([np.array([np.inf, 0.0], "float32")], [variable])
    np.testing.assert_array_equal(variable.numpy(), [1.0, 2.0])
    assert int(optimizer.skipped_steps.numpy()) == 1
    optimizer.apply([np.array([1.0, 1.0], "float32")], [variable])
    assert np.all(variable.numpy() < [1.0, 2.0])
    assert int(optimizer.iterations.numpy()) == 1


def test_global_gradient_norm_matches_numpy():
    gradients = [np.array([3.0, 4.0], "float32"), None, np.array([[12.0]], "float32")]
    np.testing.assert_allclose(float(global_gradient_norm(gradients)), 13.0, rtol=1e-6)


def test_loss_scaling_of_the_inner_optimizer_is_forwarded():
    inner = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=8.0)
    optimizer = SkipNonFiniteSteps(inner)
    assert float(optimizer.scale_loss(2.0)) == 16.0


def test_config_round_trip():
    optimizer = SkipNonFiniteSteps(keras.optimizers.Adam(0.25), max_gradient_norm=5.0)
    restored = SkipNonFiniteSteps.from_config(optimizer.get_config())
    assert isinstance(restored.inner_optimizer, keras.optimizers.Adam)
    assert restored.max_gradient_norm == 5.0
    assert float(restored.inner_optimizer.learning_rate) == 0.25


def test_bad_arguments_are_rejected():
    with pytest.raises(TypeError, match="keras.optimizers.Optimizer"):
        SkipNonFiniteSteps("adam")
    with pytest.raises(ValueError, match="twice"):
        SkipNonFiniteSteps(SkipNonFiniteSteps(keras.optimizers.SGD()))
    with pytest.raises(ValueError, match="max_gradient_norm"):
        SkipNonFiniteSteps(keras.optimizers.SGD(), max_gradient_norm=0.0)


def test_glam_model_skips_a_nan_batch_and_logs_it(tiny_config):
    lm = GLaMCausalLM(GLaMBackbone(**tiny_config))
    lm.compile()  # GLaM's recipe wraps the optimizer.
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(0, 97, size=(2, 8)).astype("int32"),
        "padding_mask": np.ones((2, 8), "int32"),
    }
    y = rng.integers(0, 97, size=(2, 8)).astype("int32")
    weights = np.ones((2, 8), "float32")
    lm.fit(x, y, sample_weight=weights, verbose=0)
    before = _state(lm)
    weights[0, 3] = np.nan
    progress = TrainingProgress(tokens_per_step=16)
    history = lm.fit(x, y, sample_weight=weights, verbose=0, callbacks=[progress]).history
    _assert_bit_identical(before, _state(lm))
    assert history["skipped_steps"] == [1]
    assert np.isnan(history["loss"][0])
    assert history["tokens_per_second"][0] > 0
