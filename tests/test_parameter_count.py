import numpy as np
import pytest

import keras_glam
from keras_glam.models.presets import builtin_preset_names

# GLAM.md's table, V = 32,000: (total, activated).
PAPER_TABLE = {
    "glam_0.1b": (137_846_016, 137_846_016),
    "glam_0.1b_64e": (1_907_612_928, 152_296_704),
    "glam_1.7b": (1_676_261_376, 1_676_261_376),
    "glam_1.7b_32e": (13_957_969_920, 1_878_374_400),
    "glam_1.7b_64e": (26_843_658_240, 1_879_160_832),
    "glam_1.7b_128e": (52_615_034_880, 1_880_733_696),
    "glam_1.7b_256e": (104_157_788_160, 1_883_879_424),
    "glam_8b": (8_721_305_600, 8_721_305_600),
    "glam_8b_64e": (142_943_227_904, 9_799_241_728),
    "glam_137b": (137_702_416_384, 137_702_416_384),
    "glam_64b_64e": (1_159_921_410_048, 94_769_520_640),
}


@pytest.mark.parametrize("name", sorted(PAPER_TABLE))
def test_paper_table_is_reproduced_exactly(name):
    assert keras_glam.count_params(name, vocabulary_size=32000) == PAPER_TABLE[name]


def test_every_paper_row_is_a_preset():
    assert set(PAPER_TABLE) <= set(builtin_preset_names())


def test_activated_64b_64e_with_the_papers_256k_vocabulary():
    # The paper's 96.6B activated figure counts a 256K vocabulary (GLAM.md).
    _, activated = keras_glam.count_params("glam_64b_64e", vocabulary_size=256000)
    assert activated == 96_604_528_640


def _trainable_count(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_experts": None},
        {"num_experts": 4},
        {"num_experts": 4, "moe_layer_interval": 3, "num_layers": 4},
        {"num_experts": 4, "top_k": 1},
        {"num_experts": 8, "num_heads": 3, "head_dim": 8},
        {"num_experts": 4, "pad_vocabulary_to_multiple_of": 8},
    ],
)
def test_count_equals_the_built_model(overrides):
    config = {
        "vocabulary_size": 101,
        "num_layers": 3,
        "hidden_dim": 16,
        "intermediate_dim": 24,
        "num_heads": 2,
        "head_dim": 12,
        **overrides,
    }
    backbone = keras_glam.GLaMBackbone(**config)
    total, activated = keras_glam.count_params(config)
    assert total == _trainable_count(backbone)
    experts = config["num_experts"]
    if experts is None:
        assert activated == total
    else:
        num_moe = len(backbone.moe_layers)
        per_expert = 2 * config["hidden_dim"] * config["intermediate_dim"]
        assert total - activated == num_moe * (experts - config.get("top_k", 2)) * per_expert


def test_count_params_rejects_unknown_preset_and_lists_known_ones():
    with pytest.raises(ValueError, match="Unknown preset 'glam_9b'.*glam_64b_64e"):
        keras_glam.count_params("glam_9b")

