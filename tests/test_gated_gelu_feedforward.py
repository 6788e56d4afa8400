"""GatedGeluFeedForward against a NumPy GEGLU, initialisation, precision and saving."""

import keras
import numpy as np
import pytest

from keras_glam.layers.gated_gelu_feedforward import GatedGeluFeedForward


def _tanh_gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _randomise(layer):
    kernels = {}
    for name in ("ffn_gate", "ffn_linear", "ffn_output"):
        kernel = np.random.normal(size=getattr(layer, name).kernel.shape)
        getattr(layer, name).kernel.assign(kernel)
        kernels[name] = kernel
    return kernels


def test_matches_numpy_geglu_with_tanh_gelu():
    x = np.random.normal(size=(2, 5, 12)).astype("float32")
    layer = GatedGeluFeedForward(intermediate_dim=20)
    layer.build(x.shape)
    w = _randomise(layer)
    x64 = x.astype(np.float64)
    expected = (_tanh_gelu(x64 @ w["ffn_gate"]) * (x64 @ w["ffn_linear"])) @ w["ffn_output"]
    np.testing.assert_allclose(layer(x), expected, rtol=1e-4, atol=1e-4)


def test_gate_activation_is_configurable():
    x = np.random.normal(size=(3, 8)).astype("float32")
    layer = GatedGeluFeedForward(intermediate_dim=16, activation="relu")
    layer.build(x.shape)
    w = _randomise(layer)
    x64 = x.astype(np.float64)
    expected = (np.maximum(x64 @ w["ffn_gate"], 0) * (x64 @ w["ffn_linear"])) @ w["ffn_output"]
    np.testing.assert_allclose(layer(x), expected, rtol=1e-4, atol=1e-4)


def test_weight_names_and_shapes_without_biases():
    layer = GatedGeluFeedForward(intermediate_dim=24, name="ffn")
    layer.build((None, None, 10))
    assert {w.path: tuple(w.shape) for w in layer.weights} == {
        "ffn/ffn_gate/kernel": (10, 24),
        "ffn/ffn_linear/kernel": (10, 24),
        "ffn/ffn_output/kernel": (24, 10),
    }


def test_fan_in_uniform_initialisation():
    model_dim, intermediate_dim = 512, 2048
    layer = GatedGeluFeedForward(intermediate_dim=intermediate_dim)
    layer.build((None, None, model_dim))
    for name, fan_in in (
        ("ffn_gate", model_dim),
        ("ffn_linear", model_dim),
        ("ffn_output", intermediate_dim),
    ):
        kernel = getattr(layer, name).kernel.numpy()
        limit = (3.0 / fan_in) ** 0.5
        assert np.abs(kernel).max() <= limit, name
        assert np.abs(kernel).max() > 0.999 * limit, name
        assert abs(kernel.std() * fan_in**0.5 - 1) < 0.01, name
        # Uniform: a tenth of the draws in each tenth of [0, limit).
        counts = np.histogram(np.abs(kernel), bins=10, range=(0, limit))[0]
        np.testing.assert_allclose(counts / kernel.size, 0.1, atol=0.005)


def test_mixed_bfloat16_output():
    x = np.random.normal(size=(2, 4, 16)).astype("float32")
    reference = GatedGeluFeedForward(intermediate_dim=32)
    expected = np.asarray(reference(x))
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = GatedGeluFeedForward(intermediate_dim=32)
    layer.build(x.shape)
    layer.set_weights(reference.get_weights())
    output = layer(x)
    assert keras.backend.standardize_dtype(output.dtype) == "bfloat16"
    assert all(w.dtype == "float32" for w in layer.weights)
    np.testing.assert_allclose(
        np.asarray(output, "float32"), expected, rtol=0.05, atol=0.05 * np.abs(expected).max()
    )


def test_serialization_round_trip(tmp_path):
    inputs = keras.Input((None, 8))
    ffn = GatedGeluFeedForward(intermediate_dim=16, activation="silu", name="ffn")
    model = keras.Model(inputs, ffn(inputs))
    path = tmp_path / "ffn.keras"
    model.save(path)
    restored = keras.saving.load_model(path)

    restored_ffn = restored.get_layer("ffn")
    assert isinstance(restored_ffn, GatedGeluFeedForward)
    assert restored_ffn.get_config() == ffn.get_config()
    x = np.random.normal(size=(2, 3, 8)).astype("float32")
    np.testing.assert_array_equal(restored(x), model(x))


@pytest.mark.parametrize("activation", ["not_an_activation", np.tanh])
def test_bad_activation_raises(activation):
    with pytest.raises(ValueError, match="activation"):
        GatedGeluFeedForward(intermediate_dim=4, activation=activation)
