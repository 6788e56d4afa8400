"""keras_glam.models.architecture: the one description of GLaM's weights, against built models."""

import numpy as np
import pytest

import keras_glam
from keras_glam.models import architecture
from keras_glam.models.memory_check import check_fits_in_memory

SMALL_PRESETS = ["glam_tiny_dense", "glam_tiny_8e", "glam_small_dense", "glam_small_16e"]


def _built(backbone):
    return {
        v.path: (tuple(v.shape), v.trainable, np.dtype(v.dtype).name) for v in backbone.weights
    }


def _described(weights, variable_dtype="float32"):
    return {w.path: (w.shape, w.trainable, w.dtype or variable_dtype) for w in weights}


@pytest.mark.parametrize("preset", SMALL_PRESETS)
def test_every_weight_of_each_small_preset_is_described(preset):
    backbone = keras_glam.GLaMBackbone.from_preset(preset)
    weights = architecture.weight_shapes(preset)
    assert len(weights) == len(backbone.weights)
    assert _described(weights) == _built(backbone)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_experts": None},
        {"pad_vocabulary_to_multiple_of": 8},
        {"moe_layer_interval": 3, "num_layers": 4, "top_k": 1},
    ],
    ids=["moe", "dense", "padded", "interval_3_top_1"],
)
def test_names_shapes_and_dtypes_under_bfloat16(tiny_config, overrides):
    config = {**tiny_config, **overrides}
    backbone = keras_glam.GLaMBackbone(**config, dtype="bfloat16")
    described = _described(architecture.weight_shapes(config), "bfloat16")
    assert described == _built(backbone)
    # The router and the routing statistics stay float32 whatever the policy.
    pinned = {path for path, (_, _, dtype) in described.items() if dtype == "float32"}
    assert all("/moe/" in path for path in pinned)
    assert len(pinned) == 3 * len(backbone.moe_layers)


def test_memory_check_counts_the_bytes_of_the_built_weights(tiny_config):
    config = {**tiny_config, "pad_vocabulary_to_multiple_of": 8}
    backbone = keras_glam.GLaMBackbone(**config, dtype="bfloat16")
    built_bytes = sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in backbone.weights
    )
    estimated, _ = check_fits_in_memory(config, "bfloat16")
    assert estimated == built_bytes


def test_elements_per_token_counts_top_k_experts_and_no_statistics(tiny_config):
    # M=16, H=32, E=4, k=2: an expert kernel [4, 16, 32] is used 2 / 4 per token.
    used = {
        w.path: architecture.elements_per_token(w, tiny_config)
        for w in architecture.weight_shapes(tiny_config)
    }
    assert used["decoder_block_0/moe/expert_wi/kernel"] == 2 * 16 * 32
    assert used["decoder_block_0/moe/router/kernel"] == 16 * 4
    assert used["decoder_block_0/moe/expert_load"] == 0
    assert used["token_embedding/embeddings"] == 97 * 16


def test_resolve_config_names_presets_and_copies_configs(tiny_config):
    name, config = architecture.resolve_config(tiny_config)
    assert (name, config) == ("custom config", tiny_config)
    assert config is not tiny_config
    assert architecture.resolve_config("glam_tiny_8e")[0] == "glam_tiny_8e"
    with pytest.raises(ValueError, match="Unknown preset 'glam_9b'.*glam_64b_64e"):
        architecture.weight_shapes("glam_9b")
    with pytest.raises(TypeError, match="or a GLaMBackbone config dict, got int"):
        architecture.weight_shapes(7)


def test_a_saved_preset_directory_is_described_like_its_config(tiny_config, tmp_path):
    keras_glam.GLaMBackbone(**tiny_config).save_to_preset(str(tmp_path))
    name, _ = architecture.resolve_config(tmp_path)
    assert name == str(tmp_path)
    assert architecture.weight_shapes(tmp_path) == architecture.weight_shapes(tiny_config)
