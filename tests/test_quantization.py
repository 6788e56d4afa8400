"""Quantized experts in every dispatch path and in routing without capacity (decoding).

The capacity paths call the expert `EinsumDense` layers themselves, so they are Keras' own
quantized computation; routing without capacity multiplies rows by single experts' matrices
(`ExpertEinsumDense.expert_matmul`) and must reproduce it exactly. Both must stay close to the
float layer, within what each mode's rounding allows.
"""

import keras
import numpy as np
import pytest
from glam_inputs import glam_inputs

import keras_glam
from keras_glam.layers import MoEFeedForward

MODEL_DIM, HIDDEN_DIM, NUM_EXPERTS = 8, 16, 4

# Quantization configs, and the relative L2 error of the MoE output against the float layer each
# may reach (measured: int8 ~0.01, int4 per channel ~0.08, float8 ~0.05-0.07 on these sizes).
_MODES = {
    "int8": ("int8", 0.03),
    "int8_weight_only": (keras.quantizers.Int8QuantizationConfig(activation_quantizer=None), 0.03),
    # Keras' grouped int4 is the least precise here (~0.15-0.25 with groups of 4 inputs).
    "int4_grouped": (keras.quantizers.Int4QuantizationConfig(block_size=4), 0.35),
    "int4_per_channel": (keras.quantizers.Int4QuantizationConfig(block_size=None), 0.15),
    "int4_quantized_inputs": (
        keras.quantizers.Int4QuantizationConfig(
            block_size=None, activation_quantizer=keras.quantizers.AbsMaxQuantizer()
        ),
        0.15,
    ),
    "float8": ("float8", 0.12),
}


def _relative_error(actual, expected):
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def _quantize(model, mode):
    """Quantizes with a mode name or a config; returns the mode name."""
    if isinstance(mode, str):
        model.quantize(mode)
        return mode
    model.quantize(config=mode)
    return mode.mode


def _moe_model():
    inputs = keras.Input(shape=(16, MODEL_DIM))
    # Capacity factor E: every expert can take every token, so the capacity path drops nothing
    # and computes the same function as routing without capacity.
    moe = MoEFeedForward(
        num_experts=NUM_EXPERTS,
        intermediate_dim=HIDDEN_DIM,
        capacity_factor=float(NUM_EXPERTS),
        dispatch="sort",
        name="moe",
    )
    return keras.Model(inputs, moe(inputs)), moe


def _inputs():
    return np.random.default_rng(0).normal(size=(2, 16, MODEL_DIM)).astype("float32")


@pytest.mark.parametrize("mode_name", list(_MODES))
def test_quantized_experts_in_every_path_stay_close_to_float(mode_name):
    config, tolerance = _MODES[mode_name]
    x = _inputs()
    model, moe = _moe_model()
    float_outputs = np.asarray(moe(x))
    mode = _quantize(model, config)
    assert moe.expert_wi.quantization_mode == moe.expert_wo.quantization_mode == mode
    dropless = np.asarray(moe(x))
    error = _relative_error(dropless, float_outputs)
    assert 1e-4 < error < tolerance  # quantized (not the float kernel), and close
    for dispatch in ("einsum", "sort", "sort_loop"):
        # Without capacity each expert is computed exactly as its layer computes it, which is
        # what every capacity path does.
        moe.dispatch = dispatch
        capacity = np.asarray(moe(x, training=True))
        np.testing.assert_allclose(dropless, capacity, rtol=1e-5, atol=1e-5, err_msg=dispatch)


@pytest.mark.parametrize("mode_name", ["int8", "int4_per_channel", "int4_grouped", "float8"])
def test_lora_on_quantized_experts_without_capacity(mode_name):
    config, tolerance = _MODES[mode_name]
    x = _inputs()
    model, moe = _moe_model()
    _, float_moe = _moe_model()
    float_moe.set_weights(moe.get_weights())
    mode = _quantize(model, config)
    for name in ("expert_wi", "expert_wo"):
        layer, float_layer = getattr(moe, name), getattr(float_moe, name)
        for lora_layer in (layer, float_layer):
            lora_layer.enable_lora(2)
        lora_b = np.random.default_rng(1).normal(scale=0.3, size=layer.lora_kernel_b.shape)
        for lora_layer in (layer, float_layer):
            lora_layer.lora_kernel_a.assign(float_layer.lora_kernel_a)
            lora_layer.lora_kernel_b.assign(lora_b.astype("float32"))
    dropless = np.asarray(moe(x))
    assert _relative_error(dropless, np.asarray(float_moe(x))) < tolerance
    if mode != "float8":  # Keras' float8 call refuses LoRA
        capacity = np.asarray(moe(x, training=True))
        np.testing.assert_allclose(dropless, capacity, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
# int8 generation: `test_glam_causal_lm.test_int8_quantization_runs_and_stays_close`.
@pytest.mark.parametrize("mode", ["int4", "float8"])
def test_quantized_glam_generates_and_reloads(mode, tiny_config, tmp_path):
    lm = keras_glam.GLaMCausalLM(keras_glam.GLaMBackbone(**tiny_config))
    inputs = glam_inputs([[1, 2, 3, 4, 5, 6]])
    before = np.asarray(lm(inputs))
    lm.quantize(mode)
    for moe in lm.backbone.moe_layers:
        assert moe.expert_wi.quantization_mode == moe.expert_wo.quantization_mode == mode
    after = np.asarray(lm(inputs))
    assert _relative_error(after, before) < 0.2
    lm.compile(sampler="greedy")
    padded = np.zeros((1, 8), "int32")
    padded[0, :3] = [3, 4, 5]
    out = lm.generate({"token_ids": padded, "padding_mask": padded != 0}, stop_token_ids=None)
    token_ids = np.asarray(out["token_ids"])
    assert token_ids.shape == (1, 8) and (token_ids[0, 3:] > 0).all()
    lm.save_to_preset(tmp_path)
    reloaded = keras_glam.GLaMCausalLM.from_preset(tmp_path)
    assert reloaded.backbone.moe_layers[0].expert_wi.quantization_mode == mode
    np.testing.assert_array_equal(np.asarray(reloaded(inputs)), after)


@pytest.mark.parametrize(
    "config",
    [
        keras.quantizers.GPTQConfig(dataset=["x"], tokenizer=lambda text: [1]),
        keras.quantizers.AWQConfig(dataset=["x"], tokenizer=lambda text: [1]),
    ],
    ids=["gptq", "awq"],
)
def test_calibrated_modes_are_refused_naming_the_supported_ones(config):
    model, _ = _moe_model()
    with pytest.raises(ValueError, match=r"moe/expert_w[io].*\('int8', 'int4', 'float8'\)"):
        model.quantize(config=config)
