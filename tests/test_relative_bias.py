"""RelativeBias: causal T5 buckets against a hand computation, table lookup, offsets."""

import math

import jax
import keras
import numpy as np
import pytest

from keras_glam.layers.relative_bias import RelativeBias
from keras_glam.layers.relative_bias import relative_position_bucket


def _expected_bucket(distance, num_buckets=32, max_distance=128):
    """GLAM.md's formula, evaluated in double precision with Python's math.log."""
    n = max(distance, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return n
    scaled = math.log(n / max_exact) / math.log(max_distance / max_exact)
    return min(num_buckets - 1, max_exact + int(scaled * (num_buckets - max_exact)))


def test_glam_buckets_match_hand_computed_formula():
    distances = np.arange(-20, 5000)
    expected = [_expected_bucket(int(d)) for d in distances]
    np.testing.assert_array_equal(relative_position_bucket(distances), expected)


@pytest.mark.parametrize(
    "distance, bucket",
    [
        (-100, 0),
        (-1, 0),
        (0, 0),
        (1, 1),
        (15, 15),
        (16, 16),
        (18, 16),
        (19, 17),  # 16 * log(19/16) / log(8) = 1.32
        (20, 17),
        (21, 18),
        (76, 27),  # 11.989: the value closest to a bucket boundary below 128
        (77, 28),
        (112, 30),
        (113, 31),
        (127, 31),
        (128, 31),  # exactly 16 -> 32, capped
        (1000, 31),
    ],
)
def test_glam_bucket_literal_values(distance, bucket):
    assert int(relative_position_bucket(np.array(distance))) == bucket


def test_buckets_generalise_to_other_sizes():
    distances = np.arange(-3, 200)
    expected = [_expected_bucket(int(d), num_buckets=8, max_distance=20) for d in distances]
    np.testing.assert_array_equal(
        relative_position_bucket(distances, num_buckets=8, max_distance=20), expected
    )


def test_bias_looks_up_the_table_per_head():
    layer = RelativeBias(num_heads=3)
    layer.build()
    table = np.arange(3)[:, None] * 100.0 + np.arange(32)[None, :]
    layer.table.assign(table)
    bias = np.asarray(layer(5, 200))

    assert bias.shape == (3, 5, 200)
    assert bias.dtype == np.float32
    for query in range(5):
        for key in range(200):
            bucket = _expected_bucket(query - key)
            np.testing.assert_array_equal(bias[:, query, key], table[:, bucket])


def test_bias_at_offset_equals_rows_of_full_bias():
    layer = RelativeBias(num_heads=4)
    full = np.asarray(layer(150, 150))
    for offset in (0, 7, 149):
        np.testing.assert_array_equal(
            layer(1, 150, query_offset=offset), full[:, offset : offset + 1]
        )
    # A traced offset, as in a compiled decoding step.
    rows_at = jax.jit(lambda offset: layer(3, 150, query_offset=offset))
    np.testing.assert_array_equal(rows_at(100), full[:, 100:103])


def test_left_padding_shifts_no_distance():
    # A row left-padded by `pad` has its tokens at pad + i: its real block of the bias over
    # the padded cache is the unpadded bias, distances up to the last bucket included.
    layer = RelativeBias(num_heads=2)
    unpadded = np.asarray(layer(140, 140))
    for pad in (1, 13, 60):
        padded = np.asarray(layer(140, 140 + pad, query_offset=pad))
        np.testing.assert_array_equal(padded[:, :, pad:], unpadded)


def test_weight_name_shape_and_initialiser():
    layer = RelativeBias(num_heads=256, name="relative_bias")
    layer.build()
    assert [w.path for w in layer.weights] == ["relative_bias/table"]
    table = layer.table.numpy()
    assert table.shape == (256, 32)
    expected_stddev = (256 * 32) ** -0.5
    assert abs(table.std() / expected_stddev - 1) < 0.05
    assert abs(table.mean()) < 0.05 * expected_stddev


def test_float32_table_and_bias_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = RelativeBias(num_heads=2)
    bias = layer(4, 4)
    assert layer.table.dtype == "float32"
    assert keras.backend.standardize_dtype(bias.dtype) == "float32"


def test_serialization_round_trip():
    layer = RelativeBias(
        num_heads=2,
        num_buckets=8,
        max_distance=20,
        initializer=keras.initializers.RandomUniform(-1.0, 1.0),
    )
    layer.build()
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(restored, RelativeBias)
    assert restored.get_config() == layer.get_config()
    restored.set_weights(layer.get_weights())
    np.testing.assert_array_equal(restored(6, 30), layer(6, 30))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_heads": 0}, "num_heads"),
        ({"num_heads": 2, "num_buckets": 1}, "num_buckets"),
        ({"num_heads": 2, "num_buckets": 32, "max_distance": 16}, "max_distance"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RelativeBias(**kwargs)
