import numpy as np
import pytest
from glam_inputs import glam_inputs as _inputs

import keras_glam
from keras_glam.layers import GatedGeluFeedForward, MoEFeedForward
from keras_glam.models.glam_backbone import attention_mask_from_segments


def test_moe_on_even_layers_dense_on_odd(tiny_config):
    backbone = keras_glam.GLaMBackbone(**{**tiny_config, "num_layers": 5})
    kinds = [type(block.feedforward) for block in backbone.transformer_layers]
    assert kinds == [MoEFeedForward, GatedGeluFeedForward] * 2 + [MoEFeedForward]
    assert len(backbone.moe_layers) == 3


def test_dense_model_when_num_experts_is_none(tiny_config):
    backbone = keras_glam.GLaMBackbone(**{**tiny_config, "num_experts": None})
    assert backbone.moe_layers == []
    assert all(isinstance(b.feedforward, GatedGeluFeedForward) for b in backbone.transformer_layers)


def test_weight_paths_follow_the_documented_names(tiny_config):
    backbone = keras_glam.GLaMBackbone(**tiny_config)
    paths = {w.path for w in backbone.trainable_weights}
    for expected in [
        "token_embedding/embeddings",
        "decoder_block_0/attention/query/kernel",
        "decoder_block_0/attention/relative_bias/table",
        "decoder_block_0/moe/router/kernel",
        "decoder_block_0/moe/expert_wi/kernel",
        "decoder_block_0/moe/expert_wo/kernel",
        "decoder_block_1/ffn/ffn_gate/kernel",
        "decoder_block_1/feedforward_norm/scale",
        "final_norm/scale",
    ]:
        assert expected in paths, f"{expected} not in {sorted(paths)}"


def test_attention_mask_is_causal_within_segments():
    mask = np.asarray(attention_mask_from_segments(np.array([[1, 1, 2, 2, 0]])))[0]
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)


def test_packed_documents_do_not_see_each_other(tiny_config):
    # A document's hidden states are the same alone or packed after another document: attention
    # and the (relative) position bias never cross the boundary, and evaluation routing drops
    # nothing, so no token depends on the other document.
    backbone = keras_glam.GLaMBackbone(**tiny_config)
    first, second = [5, 6, 7, 8], [9, 10, 11]
    packed = backbone(_inputs([first + second + [0]], [[1] * 4 + [2] * 3 + [0]]))
    alone = backbone(_inputs([second]))
    np.testing.assert_allclose(np.asarray(packed)[0, 4:7], np.asarray(alone)[0], atol=1e-5)
    first_alone = backbone(_inputs([first]))
    np.testing.assert_allclose(np.asarray(packed)[0, :4], np.asarray(first_alone)[0], atol=1e-5)


def test_causality(tiny_config):
    backbone = keras_glam.GLaMBackbone(**tiny_config)
    a = np.asarray(backbone(_inputs([[3, 4, 5, 6, 7]])))
    b = np.asarray(backbone(_inputs([[3, 4, 5, 60, 70]])))
    np.testing.assert_allclose(a[0, :3], b[0, :3], atol=1e-6)
    assert not np.allclose(a[0, 3:], b[0, 3:])


def test_out_of_range_token_ids_raise_a_clear_error(tiny_config):
    backbone = keras_glam.GLaMBackbone(**tiny_config)
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, 97\).*from 0 to 97"):
        backbone(_inputs([[0, 97]]))
    with pytest.raises(ValueError, match="from -1 to 3"):
        backbone(_inputs([[-1, 3]]))


def test_config_round_trip(tiny_config):
    backbone = keras_glam.GLaMBackbone(**tiny_config, capacity_factor=1.5, dispatch="einsum")
    clone = keras_glam.GLaMBackbone.from_config(backbone.get_config())
    assert clone.get_config() == backbone.get_config()
    clone.set_weights(backbone.get_weights())
    inputs = _inputs([[1, 2, 3, 4]])
    np.testing.assert_allclose(np.asarray(clone(inputs)), np.asarray(backbone(inputs)), atol=1e-6)


def test_embedding_is_initialised_standard_normal():
    backbone = keras_glam.GLaMBackbone(
        vocabulary_size=4000, num_layers=1, hidden_dim=64, intermediate_dim=8,
        num_heads=1, head_dim=8,
    )
    table = np.asarray(backbone.token_embedding.embeddings)
    assert abs(table.std() - 1.0) < 0.02 and abs(table.mean()) < 0.02


def test_too_big_a_preset_fails_at_once_with_the_numbers():
    with pytest.raises(MemoryError, match=r"1,159,921,410,048 parameters.*GiB.*available"):
        keras_glam.GLaMBackbone.from_preset("glam_64b_64e")


def test_aux_losses_one_per_moe_layer(tiny_config):
    backbone = keras_glam.GLaMBackbone(**tiny_config)
    backbone(_inputs([[1, 2, 3, 4]]), training=True)
    assert len(backbone.losses) == 2
    for loss in backbone.losses:
        # 0.01 times E * sum_e(mean prob * fraction routed), which lies in (0, E].
        assert 0.0 < float(loss) <= 0.01 * tiny_config["num_experts"] + 1e-6
