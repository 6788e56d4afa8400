"""GLaM's initialisation of a whole fresh model: every weight drawn on its own, at GLaM's scale.

Expert `Wo` once started as a scaled copy of `Wi` (one initializer instance, hence one seed, for
both); these tests compare every pair of equal-sized weight tensors, expert matrices (also `Wo`
transposed to `Wi`'s layout) and blocks against each other.
"""

import collections

import keras
import numpy as np
import pytest

import keras_glam
from keras_glam.layers import MoEFeedForward, RelativeBias


def _values(weight):
    return np.asarray(keras.ops.convert_to_numpy(weight.value), np.float64)


def _random_samples(weights):
    """`(data key, flat values)` of every weight that is not constant, plus each expert's
    `Wi[e]`, `Wo[e]` and `Wo[e]^T` (the layout of `Wi[e]`); a key names the numbers a sample
    holds, so a matrix and its transpose are never compared with each other."""
    for weight in weights:
        values = _values(weight)
        if values.std() == 0:  # the norms' scales, all ones
            continue
        yield weight.path, values.ravel()
        if "/expert_w" in weight.path:
            for expert, matrix in enumerate(values):
                key = f"{weight.path}[{expert}]"
                yield key, matrix.ravel()
                if "/expert_wo" in weight.path:
                    yield key, matrix.T.ravel()


def _correlation_bound(size):
    """5 standard errors of the correlation of independent samples, and at least 0.2."""
    return max(0.2, 5 / np.sqrt(size))


def _correlated_pairs(weights):
    """Pairs of equal-sized samples whose |correlation| exceeds `_correlation_bound`, and the
    largest |correlation| seen."""
    by_size = collections.defaultdict(list)
    for key, values in _random_samples(weights):
        by_size[values.size].append((key, values))
    offenders, largest = [], 0.0
    for size, samples in by_size.items():
        if len(samples) < 2:
            continue
        keys = [key for key, _ in samples]
        correlations = np.abs(np.corrcoef(np.stack([values for _, values in samples])))
        for i in range(len(samples)):
            for j in range(i + 1, len(samples)):
                if keys[i] == keys[j]:
                    continue
                largest = max(largest, correlations[i, j])
                if correlations[i, j] > _correlation_bound(size):
                    offenders.append((round(correlations[i, j], 3), keys[i], keys[j]))
    return sorted(offenders, reverse=True), largest


@pytest.mark.parametrize(
    "preset", [None, pytest.param("glam_small_16e", marks=pytest.mark.slow)], ids=["tiny", "small"]
)
def test_no_two_weights_of_a_fresh_model_are_correlated(preset, tiny_config):
    if preset is None:
        backbone = keras_glam.GLaMBackbone(**tiny_config)
    else:
        backbone = keras_glam.GLaMBackbone.from_preset(preset)
    offenders, largest = _correlated_pairs(backbone.trainable_weights)
    assert not offenders, f"correlated weights (|r|, a, b): {offenders[:5]}"
    assert largest > 0  # pairs were compared


def _glam_standard_deviations(backbone):
    """GLaM's initial standard deviation of each weight (GLAM.md), by path suffix."""
    model_dim, hidden = backbone.hidden_dim, backbone.intermediate_dim
    heads, head_dim = backbone.num_heads, backbone.head_dim
    return {
        "token_embedding/embeddings": 1.0,
        "attention/query/kernel": (model_dim * head_dim) ** -0.5,
        "attention/key/kernel": model_dim**-0.5,
        "attention/value/kernel": model_dim**-0.5,
        "attention/attention_output/kernel": (heads * head_dim) ** -0.5,
        "attention/relative_bias/table": (heads * backbone.num_buckets) ** -0.5,
        "moe/router/kernel": model_dim**-0.5,
        "moe/expert_wi/kernel": model_dim**-0.5,
        "moe/expert_wo/kernel": hidden**-0.5,
        "ffn/ffn_gate/kernel": model_dim**-0.5,
        "ffn/ffn_linear/kernel": model_dim**-0.5,
        "ffn/ffn_output/kernel": hidden**-0.5,
    }


def _assert_std(values, expected, name):
    # The estimate's relative standard error is at most ~0.71 / sqrt(n) (normal draws).
    tolerance = 5 / np.sqrt(values.size)
    assert abs(values.std() / expected - 1) < tolerance, (name, values.std(), expected)
    assert abs(values.mean()) < tolerance * expected, (name, values.mean())


@pytest.mark.slow
def test_every_weight_starts_at_glams_scale():
    backbone = keras_glam.GLaMBackbone.from_preset("glam_small_16e")
    expected = _glam_standard_deviations(backbone)
    for weight in backbone.trainable_weights:
        values = _values(weight)
        if weight.path.endswith("norm/scale"):
            np.testing.assert_array_equal(values, 1.0)
            continue
        (stddev,) = [std for suffix, std in expected.items() if weight.path.endswith(suffix)]
        _assert_std(values, stddev, weight.path)
        if "/expert_w" in weight.path:
            for expert, matrix in enumerate(values):
                _assert_std(matrix, stddev, f"{weight.path}[{expert}]")


def _two_moe_layers(**kwargs):
    layers = [MoEFeedForward(num_experts=4, intermediate_dim=32, **kwargs) for _ in range(2)]
    for layer in layers:
        layer.build((None, None, 32))
    return layers


def test_layers_sharing_one_initializer_instance_draw_their_own_weights():
    moe_layers = _two_moe_layers(
        kernel_initializer=keras.initializers.LecunUniform(),
        router_initializer=keras.initializers.LecunUniform(),
    )
    shared_table = keras.initializers.RandomNormal(stddev=0.1)
    bias_layers = [RelativeBias(num_heads=4, initializer=shared_table) for _ in range(2)]
    for layer in bias_layers:
        layer.build()
    weights = [w for layer in moe_layers + bias_layers for w in layer.trainable_weights]
    offenders, _ = _correlated_pairs(weights)
    assert not offenders, offenders[:5]


def test_a_fixed_integer_seed_is_reproducible_and_still_draws_wi_and_wo_apart():
    seeded = keras.initializers.LecunUniform(seed=7)
    first, second = _two_moe_layers(kernel_initializer=seeded, router_initializer="zeros")
    for name in ("expert_wi", "expert_wo"):
        np.testing.assert_array_equal(
            _values(getattr(first, name).kernel), _values(getattr(second, name).kernel)
        )
    offenders, _ = _correlated_pairs([first.expert_wi.kernel, first.expert_wo.kernel])
    assert not offenders, offenders


def test_one_seeded_initializer_for_router_and_experts_draws_three_weights_apart():
    """JAX's bits depend on the seed and flat index only: equal seeds share leading values."""
    seeded = keras.initializers.LecunUniform(seed=7)
    (layer,) = _two_moe_layers(kernel_initializer=seeded, router_initializer=seeded)[:1]
    router = _values(layer.router.kernel).ravel()
    for name in ("expert_wi", "expert_wo"):
        prefix = _values(getattr(layer, name).kernel).ravel()[: router.size]
        assert abs(np.corrcoef(router / router.std(), prefix / prefix.std())[0, 1]) < 0.2, name
