"""GLaMAttention against a NumPy reference, cached decoding, precision, LoRA, int8, saving."""

import math
import re
import warnings

import jax
import keras
import numpy as np
import pytest
from keras import ops

from keras_glam.layers.glam_attention import GLaMAttention

# One shape for most tests (N * Dh = 15 differs from M = 12), so JAX compiles each op once.
BATCH, LENGTH, MODEL_DIM, NUM_HEADS, HEAD_DIM = 2, 6, 12, 3, 5
# Two packed documents in the second row.
SEGMENT_IDS = [[1] * LENGTH, [1, 1, 1, 2, 2, 2]]


def _bucket(distance, num_buckets=32, max_distance=128):
    n = max(distance, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return n
    scaled = math.log(n / max_exact) / math.log(max_distance / max_exact)
    return min(num_buckets - 1, max_exact + int(scaled * (num_buckets - max_exact)))


def _reference_attention(x, weights, mask, use_zero_logit=True, use_bias=True):
    """Float64 GLaM attention: no query scaling, bias, masked softmax with a null key."""
    x = x.astype(np.float64)
    q = np.einsum("btm,mnd->btnd", x, weights["query"])
    k = np.einsum("btm,mnd->btnd", x, weights["key"])
    v = np.einsum("btm,mnd->btnd", x, weights["value"])
    logits = np.einsum("btnd,bsnd->bnts", q, k)
    if use_bias:
        length = x.shape[1]
        buckets = np.array([[_bucket(i - j) for j in range(length)] for i in range(length)])
        logits = logits + weights["table"][:, buckets][None]
    logits = np.where(mask[:, None], logits, -np.inf)
    if use_zero_logit:
        null_key = np.zeros(logits.shape[:-1] + (1,))
        logits = np.concatenate([logits, null_key], axis=-1)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    if use_zero_logit:
        probs = probs[..., :-1]
    attended = np.einsum("bnts,bsnd->btnd", probs, v)
    return np.einsum("btnd,ndm->btm", attended, weights["attention_output"])


def _packed_causal_mask(segment_ids):
    segment_ids = np.asarray(segment_ids)
    length = segment_ids.shape[1]
    causal = np.tril(np.ones((length, length), bool))[None]
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal & same_segment


def _inputs():
    x = np.random.normal(size=(BATCH, LENGTH, MODEL_DIM)).astype("float32")
    return x, _packed_causal_mask(SEGMENT_IDS)


def _random_layer(x, **kwargs):
    """A `GLaMAttention` built for `x` with `_randomise`'s weights, and those weights."""
    layer = GLaMAttention(NUM_HEADS, HEAD_DIM, **kwargs)
    layer.build(x.shape)
    return layer, _randomise(layer)


def _randomise(layer):
    """Random weights, larger than the initialiser's so every term moves the output."""
    weights = {}
    for name in ("query", "key", "value", "attention_output"):
        sublayer = getattr(layer, name)
        kernel = np.random.normal(size=sublayer.kernel.shape) * 0.4
        sublayer.kernel.assign(kernel)
        weights[name] = kernel
    if layer.use_relative_bias:
        table = np.random.normal(size=layer.relative_bias.table.shape)
        layer.relative_bias.table.assign(table)
        weights["table"] = table
    return weights


@pytest.mark.parametrize("use_zero_logit", [True, False])
def test_matches_numpy_reference(use_zero_logit):
    x, mask = _inputs()
    layer, weights = _random_layer(x, use_zero_logit=use_zero_logit)
    expected = _reference_attention(x, weights, mask, use_zero_logit=use_zero_logit)
    np.testing.assert_allclose(
        layer(x, attention_mask=mask), expected, rtol=1e-4, atol=1e-5
    )


def test_without_relative_bias_matches_reference():
    x, mask = _inputs()
    layer, weights = _random_layer(x, relative_bias=False)
    assert not any("relative_bias" in w.path for w in layer.weights)
    expected = _reference_attention(x, weights, mask, use_bias=False)
    np.testing.assert_allclose(
        layer(x, attention_mask=mask), expected, rtol=1e-4, atol=1e-5
    )


def test_zero_logit_hand_example():
    # One query, one key, one head: the weight of the key is exp(l) / (exp(l) + exp(0)).
    layer = GLaMAttention(num_heads=1, head_dim=1, relative_bias=False)
    layer.build((1, 1, 1))
    for name, value in (("query", 2.0), ("key", 1.5), ("value", 3.0)):
        getattr(layer, name).kernel.assign(np.full((1, 1, 1), value))
    layer.attention_output.kernel.assign(np.ones((1, 1, 1)))
    x = np.ones((1, 1, 1), "float32")
    logit = 2.0 * 1.5  # No 1/sqrt(head_dim) scaling.
    expected = 3.0 * math.exp(logit) / (math.exp(logit) + 1.0)
    np.testing.assert_allclose(layer(x), [[[expected]]], rtol=1e-6)


def test_cached_decoding_step_by_step_equals_full_forward():
    max_len = LENGTH + 2
    x, _ = _inputs()
    layer, _ = _random_layer(x)
    full = np.asarray(layer(x, attention_mask=_packed_causal_mask(np.ones((BATCH, LENGTH)))))

    def cached_call(inputs, cache, index):
        query_positions = index + ops.arange(ops.shape(inputs)[1])
        visible = ops.arange(max_len)[None, :] <= query_positions[:, None]
        mask = ops.broadcast_to(visible[None], (BATCH, ops.shape(inputs)[1], max_len))
        return layer(inputs, attention_mask=mask, cache=cache, cache_update_index=index)

    cache = (np.zeros((BATCH, NUM_HEADS, max_len, HEAD_DIM), "float32"),) * 2
    prefill, cache = cached_call(x[:, :3], cache, 0)
    outputs = [np.asarray(prefill)]
    step = jax.jit(cached_call)  # The cache index is traced, as in generate().
    for index in range(3, LENGTH):
        output, cache = step(x[:, index : index + 1], cache, index)
        outputs.append(np.asarray(output))

    np.testing.assert_allclose(np.concatenate(outputs, axis=1), full, rtol=1e-5, atol=1e-5)
    for cached, projection in zip(cache, (layer.key, layer.value)):
        expected = np.einsum("btm,mnd->bntd", x, projection.kernel.numpy())
        cached = np.asarray(cached)  # [B, N, positions, Dh]
        np.testing.assert_allclose(cached[:, :, :LENGTH], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(cached[:, :, LENGTH:], 0.0)


@pytest.mark.parametrize("use_zero_logit", [True, False])
def test_left_padded_cached_rows_equal_the_unpadded_reference(use_zero_logit):
    # Row 0 holds the sequence at positions 0..5, row 1 holds its first 4 tokens at 2..5
    # (2 slots of left padding, masked out): both must give the float64 reference of their
    # own unpadded tokens, the null key included.
    x, _ = _inputs()
    layer, weights = _random_layer(x, use_zero_logit=use_zero_logit)
    pad = 2
    shifted = x.copy()
    shifted[1, pad:] = x[1, : LENGTH - pad]
    shifted[1, :pad] = np.random.normal(size=(pad, MODEL_DIM))  # Padding: any values.
    real = np.ones((BATCH, LENGTH), bool)
    real[1, :pad] = False
    mask = np.tril(np.ones((LENGTH, LENGTH), bool))[None] & real[:, None, :]
    cache = (np.zeros((BATCH, NUM_HEADS, LENGTH, HEAD_DIM), "float32"),) * 2
    output, _ = layer(shifted, attention_mask=mask, cache=cache, cache_update_index=0)
    output = np.asarray(output)

    causal = np.tril(np.ones((LENGTH, LENGTH), bool))[None]
    expected = _reference_attention(x, weights, causal, use_zero_logit=use_zero_logit)
    np.testing.assert_allclose(output[0], expected[0], rtol=1e-5, atol=1e-5)
    short = LENGTH - pad
    expected_short = _reference_attention(
        x[1:, :short], weights, causal[:, :short, :short], use_zero_logit=use_zero_logit
    )
    np.testing.assert_allclose(output[1, pad:], expected_short[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_zero_logit", [True, False])
def test_fully_masked_row_gives_no_nan(use_zero_logit):
    x, mask = _inputs()
    mask[1, 5, :] = False  # A padding query that may see nothing.
    layer = GLaMAttention(NUM_HEADS, HEAD_DIM, use_zero_logit=use_zero_logit)
    output = np.asarray(layer(x, attention_mask=mask))
    assert np.all(np.isfinite(output))
    if use_zero_logit:
        # Only the null key is left: its value is zero.
        np.testing.assert_array_equal(output[1, 5], 0.0)
    gradient = jax.grad(lambda inputs: ops.sum(layer(inputs, attention_mask=mask)))(x)
    assert np.all(np.isfinite(np.asarray(gradient)))


def test_mixed_precision_keeps_float32_logits():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = GLaMAttention(num_heads=1, head_dim=2)
    layer.build((1, 2, 2))
    # Token 1's query has logits 256 (key 0) and 256.5 (key 1): distinct in float32, equal
    # in bfloat16 (spacing 2 at 256). Every weight and projection is exact in bfloat16.
    layer.query.kernel.assign([[[0.0, 0.0]], [[256.0, 1.0]]])
    layer.key.kernel.assign([[[1.0, 0.0]], [[1.0, 0.5]]])
    layer.value.kernel.assign([[[0.0, 0.0]], [[1.0, 0.0]]])
    layer.attention_output.kernel.assign([[[1.0, 0.0], [0.0, 1.0]]])
    layer.relative_bias.table.assign(np.zeros((1, 32)))
    x = np.eye(2, dtype="float32")[None]
    output = layer(x, attention_mask=np.tril(np.ones((1, 2, 2), bool)))

    assert keras.backend.standardize_dtype(output.dtype) == "bfloat16"
    assert all(w.dtype == "float32" for w in layer.weights)
    weight_of_key_1 = math.exp(0.5) / (1.0 + math.exp(0.5) + math.exp(-256.0))
    np.testing.assert_allclose(float(output[0, 1, 0]), weight_of_key_1, atol=4e-3)


def test_weight_names_and_shapes():
    layer = GLaMAttention(NUM_HEADS, HEAD_DIM, name="attention")
    layer.build((None, None, MODEL_DIM))
    heads = (MODEL_DIM, NUM_HEADS, HEAD_DIM)
    assert {w.path: tuple(w.shape) for w in layer.weights} == {
        "attention/query/kernel": heads,
        "attention/key/kernel": heads,
        "attention/value/kernel": heads,
        "attention/attention_output/kernel": (NUM_HEADS, HEAD_DIM, MODEL_DIM),
        "attention/relative_bias/table": (NUM_HEADS, 32),
    }


def test_initialiser_standard_deviations():
    model_dim, num_heads, head_dim = 1024, 8, 64
    layer = GLaMAttention(num_heads=num_heads, head_dim=head_dim)
    layer.build((None, None, model_dim))
    expected = {
        "query": (model_dim * head_dim) ** -0.5,
        "key": model_dim**-0.5,
        "value": model_dim**-0.5,
        "attention_output": (num_heads * head_dim) ** -0.5,
    }
    for name, stddev in expected.items():
        kernel = getattr(layer, name).kernel.numpy()
        assert abs(kernel.std() / stddev - 1) < 0.01, name
        assert abs(kernel.mean()) < 0.01 * stddev, name
        # A normal, not a truncated one: ~0.27% of 524288 draws lie beyond 3 stddevs.
        assert 0.002 < np.mean(np.abs(kernel) > 3 * stddev) < 0.0035, name


def test_lora_targets_query_and_value():
    x, mask = _inputs()
    layer = GLaMAttention(NUM_HEADS, HEAD_DIM)
    before = np.asarray(layer(x, attention_mask=mask))
    # What KerasHub's Backbone.enable_lora does: freeze every sublayer, then give LoRA
    # to each one named query or value.
    sublayers = list(layer._flatten_layers(include_self=False))
    for sub in sublayers:
        sub.trainable = False
    targets = [sub for sub in sublayers if sub.name in ("query", "value")]
    assert sorted(sub.name for sub in targets) == ["query", "value"]
    for sub in targets:
        sub.trainable = True
        sub.enable_lora(rank=4)

    np.testing.assert_allclose(layer(x, attention_mask=mask), before, rtol=1e-6)
    trainable = sorted(w.path for w in layer.weights if w.trainable)
    assert trainable == sorted(
        f"{layer.name}/{name}/lora_kernel_{part}"
        for name in ("query", "value")
        for part in ("a", "b")
    )
    layer.value.lora_kernel_b.assign(np.ones(layer.value.lora_kernel_b.shape))
    assert not np.allclose(layer(x, attention_mask=mask), before)


def test_int8_quantization_applies_to_projections():
    inputs = keras.Input((None, MODEL_DIM))
    mask_input = keras.Input((None, None), dtype="bool")
    attention = GLaMAttention(NUM_HEADS, HEAD_DIM, name="attention")
    model = keras.Model([inputs, mask_input], attention(inputs, attention_mask=mask_input))
    x, mask = _inputs()
    before = np.asarray(model([x, mask]))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RelativeBias has nothing to quantize.
        model.quantize("int8")

    for name in ("query", "key", "value", "attention_output"):
        assert getattr(attention, name).kernel.dtype == "int8", name
    after = np.asarray(model([x, mask]))
    relative_error = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert 0 < relative_error < 0.05


def test_serialization_round_trip(tmp_path):
    inputs = keras.Input((None, MODEL_DIM))
    mask_input = keras.Input((None, None), dtype="bool")
    attention = GLaMAttention(
        num_heads=NUM_HEADS,
        head_dim=HEAD_DIM,
        hidden_dim=MODEL_DIM,
        use_zero_logit=False,
        num_buckets=16,
        max_distance=64,
        name="attention",
    )
    model = keras.Model([inputs, mask_input], attention(inputs, attention_mask=mask_input))
    _randomise(attention)
    path = tmp_path / "attention.keras"
    model.save(path)
    restored = keras.saving.load_model(path)

    restored_attention = restored.get_layer("attention")
    assert isinstance(restored_attention, GLaMAttention)
    assert restored_attention.get_config() == attention.get_config()
    x, mask = _inputs()
    np.testing.assert_array_equal(restored([x, mask]), model([x, mask]))


def test_bad_calls_raise():
    layer = GLaMAttention(NUM_HEADS, HEAD_DIM)
    x, _ = _inputs()
    mask = np.ones((BATCH, LENGTH, 8), bool)
    keys = np.zeros((BATCH, NUM_HEADS, 8, HEAD_DIM), "float32")
    cache = (keys, keys)
    with pytest.raises(ValueError, match="cache_update_index"):
        layer(x, attention_mask=mask, cache=cache)
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x, cache=cache, cache_update_index=0)
    stacked = np.stack(cache, axis=1)  # One array of keys and values: the old layout.
    bad_caches = {
        "one array of shape [2, 2, 3, 8, 5]": stacked,
        "a tuple of shapes [[2, 3, 8, 5]]": (keys,),
        "a tuple of shapes [[2, 3, 8, 5], [2, 1, 8, 5]]": (keys, keys[:, :1]),
        "a tuple of shapes [[2, 3, 8, 5], []]": (keys, None),
        "a list of shapes [[2, 3, 8, 5], [2, 3, 8, 5]]": [keys, keys],
    }
    for found, bad in bad_caches.items():
        expected = "(keys, values) pair of [batch, num_heads, max_len, head_dim] = "
        expected += f"[B, 3, max_len, 5] arrays, got {found}."
        with pytest.raises(ValueError, match=re.escape(expected)):
            layer(x, attention_mask=mask, cache=bad, cache_update_index=0)
    # Symbolic calls check the cache too: 2 heads where the layer has 3.
    symbolic_keys = keras.KerasTensor((None, 2, 8, HEAD_DIM))
    with pytest.raises(ValueError, match=re.escape("got a tuple of shapes [[None, 2, 8, 5]")):
        layer.compute_output_spec(
            keras.KerasTensor((None, LENGTH, MODEL_DIM)),
            attention_mask=keras.KerasTensor((None, LENGTH, 8), "bool"),
            cache=(symbolic_keys, symbolic_keys),
            cache_update_index=0,
        )
    with pytest.raises(ValueError, match="hidden_dim"):
        GLaMAttention(NUM_HEADS, HEAD_DIM, hidden_dim=MODEL_DIM + 1)(x)
