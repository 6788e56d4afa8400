import importlib.util
import json
import os
import pathlib
import re
import shutil

import keras_hub
import numpy as np
import pytest

import keras_glam
from keras_glam.models import presets

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent
NAMES = presets.builtin_preset_names()
SMALL = [name for name in NAMES if presets.builtin_preset_has_tokenizer(name)]
PAPER = [name for name in NAMES if name not in SMALL]


def _prompt_inputs():
    padded = np.zeros((1, 8), "int32")
    padded[0, :3] = [2, 40, 41]
    return {"token_ids": padded, "padding_mask": padded != 0}


def test_small_presets_include_dense_and_moe_with_8_to_16_experts():
    experts = [presets.local_backbone_config(name)["num_experts"] for name in SMALL]
    assert None in experts
    assert any(e is not None and 8 <= e <= 16 for e in experts)


def test_presets_list_descriptions_and_counts():
    listing = keras_glam.GLaMCausalLM.presets
    assert set(listing) == set(NAMES) and len(NAMES) == 15
    assert "randomly initialised" in listing["glam_64b_64e"]["description"].lower()
    assert listing["glam_64b_64e"]["params"] == 1_159_921_410_048
    for cls in [keras_glam.GLaMBackbone, keras_glam.GLaMTokenizer,
                keras_glam.GLaMCausalLMPreprocessor]:
        assert cls.presets == listing


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


def _json(path):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _directory(name):
    return pathlib.Path(presets.builtin_preset_directory(name))


def test_preset_directories_hold_their_files_and_no_weights():
    vocabulary = "assets/tokenizer/vocabulary.spm"
    for name in NAMES:
        directory = _directory(name)
        files = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}
        tokenizer_files = {"tokenizer.json", "preprocessor.json", vocabulary}
        assert files == {"config.json", "metadata.json", "README.md"} | (
            tokenizer_files if name in SMALL else set()
        ), name
        card = (directory / "README.md").read_text(encoding="utf-8")
        assert _json(directory / "metadata.json")["description"] in card, name
        assert card.startswith("---\n") and f'from_preset("{name}")' in card, name
    # One trained vocabulary, copied into each small preset.
    assert len({(_directory(name) / vocabulary).read_bytes() for name in SMALL}) == 1


@pytest.mark.parametrize("name", SMALL)
def test_small_preset_files_are_what_save_to_preset_writes(name, tmp_path):
    lm = keras_glam.GLaMCausalLM.from_preset(name)
    lm.backbone.save_to_preset(tmp_path / "backbone")
    lm.preprocessor.save_to_preset(tmp_path / "preprocessor")
    directory = _directory(name)
    assert _json(tmp_path / "backbone" / "config.json") == _json(directory / "config.json")
    for file in ["tokenizer.json", "preprocessor.json"]:
        assert _json(tmp_path / "preprocessor" / file) == _json(directory / file)
    vocabulary = "assets/tokenizer/vocabulary.spm"
    saved = (tmp_path / "preprocessor" / vocabulary).read_bytes()
    assert saved == (directory / vocabulary).read_bytes()


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_differ_from_a_saved_small_one_in_sizes_only(name):
    """The paper rows are too big to build and save here; every argument but the sizes is the
    round-tripped small preset's (GLaM's settings), under the same keys."""
    sizes = {"vocabulary_size", "num_layers", "hidden_dim", "intermediate_dim", "num_heads",
             "head_dim", "num_experts"}
    saved, reference = _json(_directory(name) / "config.json"), _json(
        _directory("glam_tiny_8e") / "config.json"
    )
    assert {**saved, "config": None} == {**reference, "config": None}
    assert saved["config"].keys() == reference["config"].keys()
    assert {k: v for k, v in saved["config"].items() if k not in sizes} == {
        k: v for k, v in reference["config"].items() if k not in sizes
    }
    assert saved["config"]["vocabulary_size"] == 32000


def test_a_builtin_directory_is_a_keras_hub_preset():
    directory = presets.builtin_preset_directory("glam_tiny_8e")
    lm = keras_hub.models.CausalLM.from_preset(directory, load_weights=False)
    assert type(lm) is keras_glam.GLaMCausalLM
    assert lm.preprocessor.tokenizer.vocabulary_size() == 4096


def test_paper_preset_builds_a_causal_lm_without_preprocessor():
    shrunk = {"vocabulary_size": 64, "num_layers": 1, "hidden_dim": 8, "intermediate_dim": 8}
    lm = keras_glam.GLaMCausalLM.from_preset("glam_0.1b", **shrunk)
    assert lm.preprocessor is None
    assert lm.backbone.num_heads == 12 and lm.backbone.num_experts is None


def test_readme_preset_table_matches_the_preset_files():
    readme = (REPOSITORY / "README.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^\| `(glam_[^`]+)` \| (\d+) \| (\d+) \| (\d+) \| (\d+) x (\d+) \| ([-\d]+) "
        r"\| ([\d,]+) \| ([\d,]+) \|$",
        readme,
        flags=re.MULTILINE,
    )
    table = {name: cells for name, *cells in rows}
    expected = {}
    for name in NAMES:
        config = presets.local_backbone_config(name)
        total, activated = keras_glam.count_params(name)
        expected[name] = [
            *(str(config[key]) for key in ("num_layers", "hidden_dim", "intermediate_dim",
                                           "num_heads", "head_dim")),
            str(config["num_experts"] or "-"), f"{total:,}", f"{activated:,}",
        ]
    assert table == expected


def test_an_installed_package_finds_the_presets_inside_itself(tmp_path):
    """A wheel installs presets/ as keras_glam/presets/, which wins over a presets/ beside the
    package (a source checkout's)."""
    package = tmp_path / "keras_glam"
    (package / "models").mkdir(parents=True)
    shutil.copy(presets.__file__, package / "models" / "presets.py")
    installed = package / "presets" / "glam_tiny_8e"
    shutil.copytree(_directory("glam_tiny_8e"), installed)
    (tmp_path / "presets" / "glam_beside").mkdir(parents=True)
    (tmp_path / "presets" / "glam_beside" / "config.json").write_text("{}")
    spec = importlib.util.spec_from_file_location("installed_presets", package / "models" /
                                                  "presets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.builtin_preset_names() == ("glam_tiny_8e",)
    assert module.builtin_preset_directory("glam_tiny_8e") == str(installed.resolve())
    assert module.local_backbone_config("glam_tiny_8e")["num_experts"] == 8
