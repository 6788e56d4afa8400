"""RMSNorm against a NumPy reference, in float32 and under mixed_bfloat16."""

import keras
import ml_dtypes
import numpy as np
import pytest

from keras_glam.layers.rms_norm import RMSNorm


def _reference_rms_norm(x, scale, epsilon):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + epsilon) * scale


def test_matches_numpy_reference():
    x = np.random.normal(size=(2, 5, 16)).astype("float32") * 3.0
    scale = np.random.uniform(0.5, 2.0, size=(16,)).astype("float32")
    norm = RMSNorm(epsilon=1e-6)
    norm.build(x.shape)
    norm.scale.assign(scale)
    np.testing.assert_allclose(
        norm(x), _reference_rms_norm(x, scale, 1e-6), rtol=1e-5, atol=1e-6
    )


def test_epsilon_enters_the_denominator():
    # Every row has mean square 0.25, so epsilon 0.75 halves the output of epsilon 0.
    x = np.full((1, 3, 4), 0.5, "float32")
    np.testing.assert_allclose(RMSNorm(epsilon=0.75)(x), np.full_like(x, 0.5), rtol=1e-6)
    np.testing.assert_allclose(RMSNorm(epsilon=0.0)(x), np.ones_like(x), rtol=1e-6)


def test_single_scale_weight_initialised_to_one():
    norm = RMSNorm(name="attention_norm")
    norm.build((None, 7, 12))
    assert [w.path for w in norm.weights] == ["attention_norm/scale"]
    np.testing.assert_array_equal(norm.scale.numpy(), np.ones(12))


def test_mixed_bfloat16_computes_in_float32_and_returns_compute_dtype():
    keras.config.set_dtype_policy("mixed_bfloat16")
    x = np.random.normal(size=(4, 8, 256)).astype("float32") * 10.0
    scale = np.random.uniform(0.5, 2.0, size=(256,)).astype("float32")
    norm = RMSNorm()
    norm.build(x.shape)
    norm.scale.assign(scale)
    y = norm(x)

    assert norm.scale.dtype == "float32"
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    # The layer sees bf16 inputs; everything after that is float32, rounded once at the end.
    x_bf16 = x.astype(ml_dtypes.bfloat16).astype(np.float64)
    expected = _reference_rms_norm(x_bf16, scale, 1e-6).astype(ml_dtypes.bfloat16)
    y = np.asarray(y)
    assert np.mean(y == expected) > 0.99
    np.testing.assert_allclose(
        y.astype(np.float32), expected.astype(np.float32), rtol=2**-8
    )


def test_serialization_round_trip(tmp_path):
    inputs = keras.Input((None, 16))
    model = keras.Model(inputs, RMSNorm(epsilon=1e-5, name="final_norm")(inputs))
    model.layers[-1].scale.assign(np.random.uniform(size=(16,)).astype("float32"))
    path = tmp_path / "rms_norm.keras"
    model.save(path)
    restored = keras.saving.load_model(path)

    layer = restored.get_layer("final_norm")
    assert isinstance(layer, RMSNorm)
    assert layer.get_config() == model.get_layer("final_norm").get_config()
    x = np.random.normal(size=(2, 3, 16)).astype("float32")
    np.testing.assert_array_equal(restored(x), model(x))


def test_negative_epsilon_raises():
    with pytest.raises(ValueError, match="epsilon"):
        RMSNorm(epsilon=-1.0)
