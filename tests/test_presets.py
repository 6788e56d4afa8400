import os

import keras_hub
import numpy as np
import pytest

import keras_glam
from keras_glam.models.glam_presets import BACKBONE_PRESETS

SMALL = [name for name, p in BACKBONE_PRESETS.items() if p["vocabulary"] is not None]


def _prompt_inputs():
    padded = np.zeros((1, 8), "int32")
    padded[0, :3] = [2, 40, 41]
    return {"token_ids": padded, "padding_mask": padded != 0}


def test_small_presets_include_dense_and_moe_with_8_to_16_experts():
    experts = [BACKBONE_PRESETS[name]["config"]["num_experts"] for name in SMALL]
    assert None in experts
    assert any(e is not None and 8 <= e <= 16 for e in experts)


def test_presets_list_descriptions_and_counts():
    presets = keras_glam.GLaMCausalLM.presets
    assert set(presets) == set(BACKBONE_PRESETS)
    assert "randomly initialised" in presets["glam_64b_64e"]["description"].lower()
    assert presets["glam_64b_64e"]["params"] == 1_159_921_410_048


def test_builtin_preset_builds_with_its_tokenizer():
    lm = keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e", sequence_length=16)
    assert lm.backbone.num_experts == 8
    assert lm.preprocessor.tokenizer.vocabulary_size() == lm.backbone.vocabulary_size
    assert lm.preprocessor.sequence_length == 16
    lm.compile(sampler="greedy")
    text = lm.generate("def f(x):", max_length=12)
    assert text.startswith("def f(x):")


def test_paper_preset_has_no_tokenizer_and_says_so():
    with pytest.raises(ValueError, match="without a vocabulary"):
        keras_glam.GLaMTokenizer.from_preset("glam_0.1b")


def test_builtin_preset_accepts_backbone_overrides():
    backbone = keras_glam.GLaMBackbone.from_preset("glam_tiny_8e", capacity_factor=1.25)
    assert backbone.capacity_factor == 1.25


@pytest.mark.parametrize("cls", [keras_glam.GLaMCausalLM, keras_glam.GLaMBackbone,
                                 keras_glam.GLaMTokenizer, keras_glam.GLaMCausalLMPreprocessor])
def test_unknown_preset_lists_the_known_ones(cls):
    with pytest.raises(ValueError, match=r"Unknown preset 'glam_huge'.*glam_tiny_8e.*hf://"):
        cls.from_preset("glam_huge")


def test_save_and_load_preset_round_trip(tmp_path):
    lm = keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e", sequence_length=16)
    lm.save_to_preset(tmp_path)
    for name in ["config.json", "task.json", "preprocessor.json", "tokenizer.json",
                 "model.weights.h5", "assets/tokenizer/vocabulary.spm"]:
        assert (tmp_path / name).exists(), name
    loaded = keras_glam.GLaMCausalLM.from_preset(str(tmp_path))
    inputs = _prompt_inputs()
    np.testing.assert_array_equal(np.asarray(loaded(inputs)), np.asarray(lm(inputs)))
    assert loaded.backbone.get_config() == lm.backbone.get_config()
    assert loaded.preprocessor.sequence_length == 16
    # keras-hub's own entry point resolves to our classes.
    generic = keras_hub.models.CausalLM.from_preset(str(tmp_path))
    assert type(generic) is keras_glam.GLaMCausalLM
    np.testing.assert_array_equal(np.asarray(generic(inputs)), np.asarray(lm(inputs)))


def test_sharded_weights_round_trip(tmp_path):
    lm = keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e")
    lm.save_to_preset(tmp_path, max_shard_size=0.0011)  # 1.1 MB shards: several files
    assert len(list(tmp_path.glob("model_*.weights.h5"))) > 1
    loaded = keras_glam.GLaMCausalLM.from_preset(str(tmp_path))
    np.testing.assert_array_equal(
        np.asarray(loaded(_prompt_inputs())), np.asarray(lm(_prompt_inputs()))
    )


def test_vocabulary_mismatch_is_refused():
    backbone = keras_glam.GLaMBackbone.from_preset("glam_tiny_8e", vocabulary_size=5000)
    preprocessor = keras_glam.GLaMCausalLMPreprocessor.from_preset("glam_tiny_8e")
    with pytest.raises(ValueError, match=r"tokenizer has 4096 tokens.*vocabulary_size is 5000"):
        keras_glam.GLaMCausalLM(backbone, preprocessor)


def test_a_file_is_not_a_preset(tmp_path):
    path = tmp_path / "model.weights.h5"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file, not a preset directory"):
        keras_glam.GLaMCausalLM.from_preset(str(path))


def test_truncated_weights_fail_loudly(tmp_path):
    lm = keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e")
    lm.save_to_preset(tmp_path)
    weights = tmp_path / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[: os.path.getsize(weights) // 2])
    with pytest.raises(Exception, match="(?i)truncat|corrupt|unable|signature|file"):
        keras_glam.GLaMCausalLM.from_preset(str(tmp_path))
