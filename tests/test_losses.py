"""GLaM's loss and its logged terms against NumPy."""

import keras
import numpy as np
import pytest

from keras_glam.models.glam_backbone import GLaMBackbone
from keras_glam.models.glam_causal_lm import GLaMCausalLM
from keras_glam.models.losses import language_model_losses
from keras_glam.models.losses import routing_statistics
from keras_glam.models.losses import weighted_token_mean


def _numpy_losses(labels, logits, weights):
    logits = logits.astype("float64")
    peak = logits.max(axis=-1, keepdims=True)
    log_normalizer = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]
    label_logits = np.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    cross_entropy = ((log_normalizer - label_logits) * weights).sum() / weights.sum()
    z_loss = (log_normalizer**2 * weights).sum() / weights.sum()
    return cross_entropy, z_loss


def _random_batch(rng, batch=2, length=5, vocabulary=7):
    logits = rng.normal(scale=3.0, size=(batch, length, vocabulary)).astype("float32")
    labels = rng.integers(0, vocabulary, size=(batch, length))
    weights = (rng.random((batch, length)) > 0.3).astype("float32")
    weights[0, 0] = 1.0
    return labels, logits, weights


def test_cross_entropy_and_z_loss_match_numpy():
    labels, logits, weights = _random_batch(np.random.default_rng(0))
    losses = language_model_losses(labels, logits, weights)
    expected_cross_entropy, expected_z_loss = _numpy_losses(labels, logits, weights)
    np.testing.assert_allclose(float(losses.cross_entropy), expected_cross_entropy, rtol=1e-5)
    np.testing.assert_allclose(float(losses.z_loss), expected_z_loss, rtol=1e-5)


def test_padding_changes_nothing():
    rng = np.random.default_rng(1)
    labels, logits, weights = _random_batch(rng)
    padded_logits = np.concatenate([logits, 1e4 * rng.normal(size=(2, 3, 7))], axis=1)
    padded_labels = np.concatenate([labels, np.zeros((2, 3), "int64")], axis=1)
    padded_weights = np.concatenate([weights, np.zeros((2, 3), "float32")], axis=1)
    plain = language_model_losses(labels, logits, weights)
    padded = language_model_losses(padded_labels, padded_logits.astype("float32"), padded_weights)
    np.testing.assert_allclose(float(padded.cross_entropy), float(plain.cross_entropy), rtol=1e-6)
    np.testing.assert_allclose(float(padded.z_loss), float(plain.z_loss), rtol=1e-6)


def test_keras_default_reduction_divides_by_positions_not_tokens():
    # Why GLaM's loss does not use Keras' default reduction: with sample weights,
    # "sum_over_batch_size" divides by every position, padding included.
    labels, logits, weights = _random_batch(np.random.default_rng(2))
    expected, _ = _numpy_losses(labels, logits, weights)
    default = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    by_tokens = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )
    np.testing.assert_allclose(
        float(default(labels, logits, weights)),
        expected * weights.sum() / weights.size,
        rtol=1e-5,
    )
    np.testing.assert_allclose(float(by_tokens(labels, logits, weights)), expected, rtol=1e-5)
    np.testing.assert_allclose(
        float(weighted_token_mean(np.ones_like(weights) * 3.0, weights)), 3.0, rtol=1e-6
    )


def test_float32_even_from_bfloat16_logits():
    labels, logits, weights = _random_batch(np.random.default_rng(3))
    losses = language_model_losses(labels, keras.ops.cast(logits, "bfloat16"), weights)
    assert keras.backend.standardize_dtype(losses.cross_entropy.dtype) == "float32"
    assert keras.backend.standardize_dtype(losses.z_loss.dtype) == "float32"


@pytest.fixture
def tiny_lm(tiny_config):
    return GLaMCausalLM(GLaMBackbone(**tiny_config))


def _token_batch(rng, vocabulary, batch=2, length=8):
    x = {
        "token_ids": rng.integers(0, vocabulary, size=(batch, length)).astype("int32"),
        "padding_mask": np.ones((batch, length), "int32"),
    }
    y = rng.integers(0, vocabulary, size=(batch, length)).astype("int32")
    weights = np.ones((batch, length), "float32")
    weights[1, -3:] = 0.0
    return x, y, weights


@pytest.mark.parametrize("z_loss_weight", [1e-4, 0.5])
def test_compute_loss_is_cross_entropy_plus_z_loss_plus_aux(tiny_lm, z_loss_weight):
    tiny_lm.compile(z_loss_weight=z_loss_weight)
    x, y, weights = _token_batch(np.random.default_rng(4), tiny_lm.backbone.vocabulary_size)
    logits = np.asarray(tiny_lm(x, training=True))
    aux = sum(float(loss) for loss in tiny_lm.losses)
    assert len(tiny_lm.losses) == len(tiny_lm.backbone.moe_layers) == 2
    total = float(tiny_lm.compute_loss(x, y, logits, weights, training=True))
    cross_entropy, z_loss = _numpy_losses(y, logits, weights)
    np.testing.assert_allclose(total, cross_entropy + z_loss_weight * z_loss + aux, rtol=1e-5)


def test_logged_terms_add_up_to_the_loss_and_match_numpy(tiny_lm):
    tiny_lm.compile(optimizer=keras.optimizers.SGD(0.0))
    x, y, weights = _token_batch(np.random.default_rng(5), tiny_lm.backbone.vocabulary_size)
    logits = np.asarray(tiny_lm(x, training=True))
    aux = sum(float(loss) for loss in tiny_lm.losses)
    logs = tiny_lm.fit(x, y, sample_weight=weights, batch_size=2, verbose=0).history
    cross_entropy, z_loss = _numpy_losses(y, logits, weights)
    np.testing.assert_allclose(logs["cross_entropy"][0], cross_entropy, rtol=1e-5)
    np.testing.assert_allclose(logs["z_loss"][0], 1e-4 * z_loss, rtol=1e-4)
    np.testing.assert_allclose(logs["aux_loss"][0], aux, rtol=1e-5)
    np.testing.assert_allclose(
        logs["loss"][0],
        logs["cross_entropy"][0] + logs["z_loss"][0] + logs["aux_loss"][0],
        rtol=1e-5,
    )


def test_routing_statistics_only_in_training_logs(tiny_lm):
    tiny_lm.compile()
    x, y, weights = _token_batch(np.random.default_rng(6), tiny_lm.backbone.vocabulary_size)
    history = tiny_lm.fit(x, y, sample_weight=weights, batch_size=2, verbose=0).history
    for name in ("dropped_top1", "dropped_top2", "expert_load_cv"):
        assert name in history
    evaluation = tiny_lm.evaluate(x, y, sample_weight=weights, return_dict=True, verbose=0)
    assert set(evaluation) == {"loss", "accuracy", "cross_entropy", "z_loss", "aux_loss"}


def test_evaluation_cross_entropy_is_the_mean_over_all_tokens(tiny_lm):
    tiny_lm.compile()
    rng = np.random.default_rng(7)
    x, y, weights = _token_batch(rng, tiny_lm.backbone.vocabulary_size, batch=3)
    weights[2, 1:] = 0.0  # The last batch (of 1 row) has one target token.
    logits = np.asarray(tiny_lm(x, training=False))
    expected, _ = _numpy_losses(y, logits, weights)
    evaluation = tiny_lm.evaluate(
        x, y, sample_weight=weights, batch_size=2, return_dict=True, verbose=0
    )
    np.testing.assert_allclose(evaluation["cross_entropy"], expected, rtol=1e-5)


def test_routing_statistics_match_numpy(tiny_lm):
    layers = tiny_lm.backbone.moe_layers
    loads = [np.array([10.0, 0.0, 4.0, 2.0]), np.array([4.0, 4.0, 4.0, 4.0])]
    dropped = [np.array([0.1, 0.3]), np.array([0.0, 0.5])]
    for layer, load, fraction in zip(layers, loads, dropped):
        layer.expert_load.assign(load)
        layer.dropped_fraction.assign(fraction)
    statistics = routing_statistics(layers)
    np.testing.assert_allclose(float(statistics["dropped_top1"]), 0.05, rtol=1e-6)
    np.testing.assert_allclose(float(statistics["dropped_top2"]), 0.4, rtol=1e-6)
    expected_cv = np.mean([load.std() / load.mean() for load in loads])
    np.testing.assert_allclose(float(statistics["expert_load_cv"]), expected_cv, rtol=1e-6)
