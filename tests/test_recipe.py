"""`GLaMCausalLM.compile()` gives GLaM's recipe; every part can be overridden."""

import keras
import keras_hub
import numpy as np
import pytest

from keras_glam.models.glam_backbone import GLaMBackbone
from keras_glam.models.glam_causal_lm import GLaMCausalLM
from keras_glam.optimizers.adafactor import GLaMAdafactor
from keras_glam.optimizers.recipe import glam_learning_rate
from keras_glam.optimizers.recipe import glam_optimizer
from keras_glam.optimizers.schedules import GLaMLearningRateSchedule
from keras_glam.optimizers.skip_nonfinite import SkipNonFiniteSteps


@pytest.fixture
def tiny_lm(tiny_config):
    return GLaMCausalLM(GLaMBackbone(**tiny_config))


def _batch(vocabulary_size, seed=0):
    rng = np.random.default_rng(seed)
    x = {
        "token_ids": rng.integers(0, vocabulary_size, size=(2, 8)).astype("int32"),
        "padding_mask": np.ones((2, 8), "int32"),
    }
    return x, rng.integers(0, vocabulary_size, size=(2, 8)).astype("int32"), np.ones((2, 8))


def test_compile_without_arguments_is_glams_recipe(tiny_lm):
    tiny_lm.compile()
    optimizer = tiny_lm.optimizer
    assert isinstance(optimizer, SkipNonFiniteSteps)
    inner = optimizer.inner_optimizer
    assert isinstance(inner, GLaMAdafactor)
    assert inner.beta_1 is None and inner.clip_threshold == 1.0
    assert inner.multiply_by_parameter_scale and inner.decay_exponent == 0.8
    schedule = keras.saving.deserialize_keras_object(inner.get_config()["learning_rate"])
    assert isinstance(schedule, GLaMLearningRateSchedule)
    rates = [float(schedule(step)) for step in (0, 5000, 10000, 40000, 90000)]
    np.testing.assert_allclose(rates, [0.01, 0.01, 0.01, 0.005, 1 / 300], rtol=1e-6)
    assert tiny_lm.z_loss_weight == 1e-4
    moe_layers = tiny_lm.backbone.moe_layers
    assert [layer.aux_loss_weight for layer in moe_layers] == [0.01, 0.01]
    tiny_lm(_batch(97)[0], training=True)
    assert len(tiny_lm.losses) == len(moe_layers)


def test_every_knob_can_be_overridden(tiny_lm):
    tiny_lm.compile(
        optimizer=keras.optimizers.SGD(0.5),
        z_loss_weight=0.0,
        skip_nonfinite_steps=False,
        weighted_metrics=[],
    )
    assert isinstance(tiny_lm.optimizer, keras.optimizers.SGD)
    assert tiny_lm.z_loss_weight == 0.0
    x, y, weights = _batch(97)
    history = tiny_lm.fit(x, y, sample_weight=weights, verbose=0).history
    assert history["z_loss"] == [0.0] and "accuracy" not in history

    tiny_lm.compile(optimizer="adam")  # A name is resolved, then wrapped.
    assert isinstance(tiny_lm.optimizer.inner_optimizer, keras.optimizers.Adam)
    assert sorted(set(tiny_lm.metrics_names)) == sorted(tiny_lm.metrics_names)  # No duplicates.


def test_a_custom_loss_replaces_the_cross_entropy_term(tiny_lm):
    def constant_loss(y_true, y_pred, sample_weight=None):
        return keras.ops.convert_to_tensor(2.5)

    tiny_lm.compile(loss=constant_loss)
    x, y, weights = _batch(97)
    logits = np.asarray(tiny_lm(x, training=True), "float64")
    aux = sum(float(loss) for loss in tiny_lm.losses)
    log_normalizer = np.log(np.exp(logits).sum(axis=-1))
    expected = 2.5 + 1e-4 * np.mean(log_normalizer**2) + aux
    total = float(tiny_lm.compute_loss(x, y, logits.astype("float32"), weights))
    np.testing.assert_allclose(total, expected, rtol=1e-6)


def test_sampler_argument_still_works(tiny_lm):
    tiny_lm.compile(sampler="greedy")
    assert isinstance(tiny_lm.sampler, keras_hub.samplers.GreedySampler)
    prompt = {
        "token_ids": np.array([[5, 6, 0, 0, 0, 0]]),
        "padding_mask": np.array([[1, 1, 0, 0, 0, 0]]),
    }
    first = tiny_lm.generate(prompt, stop_token_ids=None)
    second = tiny_lm.generate(prompt, stop_token_ids=None)
    np.testing.assert_array_equal(first["token_ids"], second["token_ids"])
    assert isinstance(tiny_lm.optimizer, SkipNonFiniteSteps)


def test_mixed_bfloat16_trains_with_float32_weights_and_losses(tiny_config):
    lm = GLaMCausalLM(GLaMBackbone(**tiny_config, dtype="mixed_bfloat16"))
    lm.compile()
    x, y, weights = _batch(97)
    logits = lm(x, training=True)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    assert all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in lm.weights)
    history = lm.fit(x, y, sample_weight=weights, verbose=0).history
    assert np.isfinite(history["loss"][0])


def test_learning_rate_helpers():
    schedule = glam_learning_rate(warmup_steps=100, peak_learning_rate=0.05)
    np.testing.assert_allclose(
        [float(schedule(step)) for step in (0, 100, 400)], [0.05, 0.05, 0.025], rtol=1e-6
    )
    np.testing.assert_allclose(float(glam_learning_rate(10000)(0)), 0.01, rtol=1e-6)
    optimizer = glam_optimizer(warmup_steps=300, beta_1=0.9)
    assert isinstance(optimizer, GLaMAdafactor) and optimizer.beta_1 == 0.9
    with pytest.raises(ValueError, match="peak_learning_rate"):
        glam_learning_rate(100, peak_learning_rate=0.0)


def test_recipe_factors_attention_kernels_as_glams_matrices(tiny_config):
    # [128, 2, 64] kernels are GLaM's [128, 128] matrices: factored, although no axis of the
    # 3-D kernel but M reaches 128.
    config = dict(tiny_config, num_layers=1, hidden_dim=128, num_heads=2, head_dim=64)
    lm = GLaMCausalLM(GLaMBackbone(**config))
    lm.compile()
    lm.optimizer.build(lm.trainable_variables)
    slots = {
        v.path.split("/")[-1]: tuple(v.shape)
        for v in lm.optimizer.inner_optimizer.variables
        if "_attention_" in v.path and "_attention_norm_" not in v.path
    }
    prefix = "decoder_block_0_attention"
    expected = {f"{prefix}_relative_bias_table_second_moment": (2, 32)}
    for name in ("query", "key", "value"):
        expected[f"{prefix}_{name}_kernel_second_moment_mean_over_axis_0"] = (2, 64)
        expected[f"{prefix}_{name}_kernel_second_moment_mean_over_axes_1_2"] = (128,)
    expected[f"{prefix}_attention_output_kernel_second_moment_mean_over_axes_0_1"] = (128,)
    expected[f"{prefix}_attention_output_kernel_second_moment_mean_over_axis_2"] = (2, 64)
    assert slots == expected


def test_training_still_offers_the_optimizer_recipe():
    """The optimizers moved below the models; `keras_glam.training` re-exports them."""
    from keras_glam import training

    assert training.GLaMAdafactor is GLaMAdafactor
    assert training.GLaMLearningRateSchedule is GLaMLearningRateSchedule
    assert training.SkipNonFiniteSteps is SkipNonFiniteSteps
    assert training.glam_optimizer is glam_optimizer
    assert training.glam_learning_rate is glam_learning_rate
