"""keras_glam.distribution: layouts, ExpertParallel, vocabulary padding, and sharded runs.

The sharded runs need 8 devices, which JAX only simulates when `XLA_FLAGS` is set before it is
imported; they run as scripts of `tests/distributed/` in fresh interpreters (this session keeps
its single device) and the tests assert on the JSON they print.
"""

import pathlib
import re
import sys

import keras
import numpy as np
import pytest

import keras_glam
from keras_glam import distribution as glam_distribution

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "distributed"))
from check_runner import run_check  # noqa: E402

EXPERT_KERNEL_SHAPES = ("[8,24,40]", "[8,40,24]")  # tests/distributed/common.py CONFIG


def _single_device_mesh():
    return keras.distribution.DeviceMesh((1, 1, 1), glam_distribution.MESH_AXES)


def _layout(layout_map, path):
    return layout_map[path].axes


# --- Layout map (one device: the map itself does not need a mesh of several) -------------------


def test_every_weight_matches_exactly_one_key(tiny_config):
    backbone = keras_glam.GLaMBackbone(**tiny_config)
    layout_map = keras_glam.GLaMBackbone.get_layout_map(_single_device_mesh())

    assert all(key.startswith(".*") for key in layout_map)
    assert glam_distribution.unmatched_weights(backbone, layout_map) == []
    for variable in backbone.weights:
        matches = [key for key in layout_map if re.fullmatch(key, variable.path)]
        assert len(matches) == 1, (variable.path, matches)


def test_only_the_allow_list_is_replicated(tiny_config):
    backbone = keras_glam.GLaMBackbone(**tiny_config)
    layout_map = keras_glam.GLaMBackbone.get_layout_map(_single_device_mesh())
    for variable in backbone.weights:
        replicated = all(axis is None for axis in _layout(layout_map, variable.path))
        allowed = any(
            re.fullmatch(key, variable.path) for key in glam_distribution.REPLICATED_WEIGHTS
        )
        assert replicated == allowed, variable.path


@pytest.mark.parametrize("fsdp", [False, True])
def test_layouts_follow_praxis_glam_sharding(fsdp):
    # praxis set_sharding_params_v1 with (replica, data, mdl) -> (data, expert, model):
    # emh [data, None, mdl], ehm [data, mdl, None], attention [data, mdl, None], ffn [data, mdl]
    # and [mdl, data], embedding [mdl, data]; the dense weights' "data" split is `fsdp` here.
    m = "expert" if fsdp else None
    layout_map = glam_distribution.glam_layout_map(_single_device_mesh(), fsdp=fsdp)
    expected = {
        "token_embedding/embeddings": ("model", m),
        "decoder_block_0/attention/query/kernel": (m, "model", None),
        "decoder_block_0/attention/attention_output/kernel": ("model", None, m),
        "decoder_block_0/attention/relative_bias/table": ("model", None),
        "decoder_block_0/moe/router/kernel": (None, None),
        "decoder_block_0/moe/expert_wi/kernel": ("expert", None, "model"),
        "decoder_block_0/moe/expert_wo/kernel": ("expert", "model", None),
        "decoder_block_1/ffn/ffn_gate/kernel": (m, "model"),
        "decoder_block_1/ffn/ffn_output/kernel": ("model", m),
        "decoder_block_0/moe/expert_inputs_by_group": (None, ("data", "expert"), None, None),
        "decoder_block_0/moe/expert_inputs": ("expert", "data", None, None),
        "decoder_block_0/moe/expert_outputs": ("expert", "data", None, None),
        "decoder_block_0/moe/expert_outputs_by_group": (None, ("data", "expert"), None, None),
    }
    for path, axes in expected.items():
        assert _layout(layout_map, path) == axes, path


def test_layer_output_paths_match_no_key():
    # Keras looks up `{layer path}/output` for every layer call under a distribution; a match
    # would constrain activations nobody meant to constrain.
    layout_map = glam_distribution.glam_layout_map(_single_device_mesh())
    for layer in ("token_embedding", "decoder_block_0/moe", "decoder_block_0/moe/expert_wo",
                  "decoder_block_0/attention/query", "final_norm"):
        assert layout_map[f"glam_backbone/{layer}/output"] is None


def test_axes_missing_from_the_mesh_are_not_split():
    mesh = keras.distribution.DeviceMesh((1,), ("batch",))
    layout_map = keras_glam.GLaMBackbone.get_layout_map(mesh, data_axis="batch")
    assert _layout(layout_map, "decoder_block_0/moe/expert_wi/kernel") == (None, None, None)
    assert _layout(layout_map, "decoder_block_0/moe/expert_inputs_by_group")[1] == "batch"


def test_layout_rules_reject_bad_axis_names():
    with pytest.raises(ValueError, match="different mesh axes"):
        glam_distribution.layout_rules(("data", "expert"), data_axis="data", expert_axis="data")
    with pytest.raises(TypeError, match="mesh axis name"):
        glam_distribution.layout_rules(("data",), model_axis=3)
    with pytest.raises(TypeError, match="DeviceMesh"):
        glam_distribution.glam_layout_map((2, 4))


def test_multi_axis_layout_validates_every_name():
    mesh = keras.distribution.DeviceMesh((1, 1), ("data", "expert"))
    layout = glam_distribution.MultiAxisLayout((("data", "expert"), None), mesh)
    assert tuple(layout.backend_layout.spec) == (("data", "expert"), None)
    with pytest.raises(ValueError, match="Unknown mesh axes"):
        glam_distribution.MultiAxisLayout((("data", "model"), None), mesh)


# --- ExpertParallel and expert_parallel on this session's one device --------------------------


def test_expert_parallel_splits_the_batch_over_data_and_expert():
    distribution = glam_distribution.expert_parallel()
    assert isinstance(distribution, keras.distribution.ModelParallel)
    assert distribution.device_mesh.axis_names == glam_distribution.MESH_AXES
    assert distribution.device_mesh.shape == (1, 1, 1)
    assert distribution.batch_axes == ("data", "expert")
    assert distribution.num_model_replicas == 1
    assert distribution.get_data_layout((4, 16)).axes == (("data", "expert"), None)


def test_expert_parallel_rejects_meshes_that_do_not_match_the_devices():
    with pytest.raises(ValueError, match="does not divide the 1 devices"):
        glam_distribution.expert_parallel(expert=2)
    with pytest.raises(ValueError, match="does not match the 1 devices"):
        glam_distribution.expert_parallel(data=2, devices=["cpu:0"])
    with pytest.raises(ValueError, match="positive int"):
        glam_distribution.expert_parallel(model=0)


def test_expert_parallel_distribution_rejects_bad_arguments():
    layout_map = glam_distribution.glam_layout_map(_single_device_mesh())
    with pytest.raises(TypeError, match="LayoutMap"):
        glam_distribution.ExpertParallel({"a": None})
    with pytest.raises(ValueError, match="batch_axes"):
        glam_distribution.ExpertParallel(layout_map, batch_axes=("data", "replica"))


def test_model_under_one_device_distribution_matches_plain_model(tiny_config):
    inputs = {"token_ids": np.array([[3, 9, 27, 81, 4, 1]]), "padding_mask": np.ones((1, 6))}
    keras.utils.set_random_seed(0)
    plain = keras_glam.GLaMBackbone(**tiny_config, dispatch="einsum")
    expected = plain(inputs, training=True)
    with glam_distribution.expert_parallel().scope():
        distributed = keras_glam.GLaMBackbone(**tiny_config, dispatch="einsum")
        distributed.set_weights(plain.get_weights())
        actual = distributed(inputs, training=True)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)


def test_gather_to_host_returns_complete_values(tiny_config):
    backbone = keras_glam.GLaMBackbone(**tiny_config)
    for array, variable in zip(glam_distribution.gather_to_host(backbone.weights),
                               backbone.weights):
        np.testing.assert_array_equal(array, keras.ops.convert_to_numpy(variable))


# --- Vocabulary padding ------------------------------------------------------------------------


def test_padded_vocabulary_logits_are_masked_and_the_rest_unchanged(tiny_config):
    inputs = {"token_ids": np.array([[3, 9, 27, 81, 4, 1]]), "padding_mask": np.ones((1, 6))}
    keras.utils.set_random_seed(0)
    plain = keras_glam.GLaMCausalLM(keras_glam.GLaMBackbone(**tiny_config))
    padded = keras_glam.GLaMCausalLM(
        keras_glam.GLaMBackbone(**tiny_config, pad_vocabulary_to_multiple_of=8)
    )
    vocabulary = tiny_config["vocabulary_size"]  # 97 -> 104 rows
    weights = plain.get_weights()
    weights[0] = np.concatenate([weights[0], np.full((104 - vocabulary, 16), 5.0, "float32")])
    padded.set_weights(weights)

    expected = keras.ops.convert_to_numpy(plain(inputs))
    actual = keras.ops.convert_to_numpy(padded(inputs))
    assert actual.shape[-1] == 104
    np.testing.assert_allclose(actual[..., :vocabulary], expected, rtol=1e-6, atol=1e-6)
    assert np.all(actual[..., vocabulary:] == -1e9)
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(actual))
    assert np.all(probabilities[..., vocabulary:] == 0.0)


def test_padded_vocabulary_round_trips_and_validates(tiny_config):
    backbone = keras_glam.GLaMBackbone(**tiny_config, pad_vocabulary_to_multiple_of=8)
    restored = keras_glam.GLaMBackbone.from_config(backbone.get_config())
    assert restored.token_embedding.embeddings.shape == (104, 16)
    assert restored.vocabulary_size == 97
    with pytest.raises(ValueError, match="pad_vocabulary_to_multiple_of"):
        keras_glam.GLaMBackbone(**tiny_config, pad_vocabulary_to_multiple_of=0)


# --- 8 simulated devices, in subprocesses -------------------------------------------------------


@pytest.fixture(scope="module")
def sharding():
    return run_check("check_sharding.py")


@pytest.fixture(scope="module")
def gradients():
    return run_check("check_equivalence.py", "gradients")


@pytest.fixture(scope="module")
def training():
    return run_check("check_equivalence.py", "training")


@pytest.mark.slow
def test_sharded_weights_have_layout_keys_and_only_the_router_is_whole(sharding):
    assert sharding["num_devices"] == 8
    assert sharding["unmatched"] == []
    whole = [
        path
        for path, layout in sharding["layouts"].items()
        if len(layout["shape"]) >= 2 and all(axis is None for axis in layout["spec"])
    ]
    assert whole == ["decoder_block_0/moe/router/kernel", "decoder_block_2/moe/router/kernel"]


@pytest.mark.slow
def test_each_device_holds_its_two_of_eight_experts(sharding):
    # expert=4: E / 4 = 2 experts per device; data=2: every expert on two devices.
    for path, held in sharding["experts_by_device"].items():
        assert len(held) == 8, path
        assert all(stop - start == 2 for start, stop in held.values()), path
        copies = {}
        for start, stop in held.values():
            for expert in range(start, stop):
                copies[expert] = copies.get(expert, 0) + 1
        assert copies == {expert: 2 for expert in range(8)}, path
    layout = sharding["layouts"]["decoder_block_0/moe/expert_wi/kernel"]
    assert layout["spec"] == ["expert", None, "model"]
    assert layout["shard_shapes"] == [[2, 24, 40]]


@pytest.mark.slow
def test_batch_and_routing_groups_follow_the_shards(sharding):
    assert sharding["batch_spec"] == [["data", "expert"], None]
    assert sharding["batch_rows_per_device"] == [1]
    assert sharding["routing_groups"] == [8, 8]
    assert np.isfinite(sharding["fit_loss"])


@pytest.mark.slow
def test_train_step_moves_tokens_by_all_to_all_and_gathers_no_expert_weights(sharding):
    counts = sharding["collectives"]
    # Per MoE layer: dispatch and combine, forward and backward.
    assert counts.get("all-to-all") == 4 * sharding["num_moe_layers"]
    gathered = sharding["collective_types"].get("all-gather", [])
    assert not [t for t in gathered if any(shape in t for shape in EXPERT_KERNEL_SHAPES)]
    assert counts.get("all-gather", 0) == 0


@pytest.mark.slow
def test_tensor_parallel_mesh_needs_and_masks_a_padded_vocabulary(sharding):
    layouts = sharding["tensor_parallel_layouts"]
    assert layouts["token_embedding/embeddings"]["spec"] == ["model", None]
    assert layouts["token_embedding/embeddings"]["shard_shapes"] == [[49, 24]]
    assert layouts["decoder_block_1/attention/query/kernel"]["shard_shapes"] == [[24, 1, 8]]
    assert layouts["decoder_block_0/moe/expert_wo/kernel"]["shard_shapes"] == [[4, 20, 24]]
    assert sharding["padded_logits_shape"] == [8, 16, 98]
    assert sharding["padded_logits_max"] == -1e9
    assert "pad_vocabulary_to_multiple_of=2" in sharding["unpadded_vocabulary_error"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data2_expert4", "data8", "data2_expert2_model2"])
def test_sharded_loss_and_gradients_equal_one_device(gradients, mesh):
    outcome = gradients[mesh]
    np.testing.assert_allclose(outcome["loss"], outcome["expected_loss"], rtol=1e-6)
    assert outcome["gradient_difference"] < 1e-5
    assert outcome["padding_rows_gradient"] == 0.0


@pytest.mark.slow
def test_equal_grouping_is_what_makes_the_comparison_exact(gradients):
    # One routing group of all tokens has a different capacity and drops other tokens.
    grouped = gradients["data2_expert4"]["expected_loss"]
    assert abs(gradients["one_group_loss"] - grouped) > 1e-4


@pytest.mark.slow
def test_sharded_generation_gives_the_same_tokens(gradients):
    assert gradients["data2_expert4"]["tokens"] == gradients["reference_tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data2_expert4", "data8"])
def test_fit_on_tf_data_steps_like_one_device(training, mesh):
    np.testing.assert_allclose(
        training[mesh]["step_losses"], training["reference_step_losses"], rtol=1e-6
    )
    assert training[mesh]["weights_difference"] < 1e-5
