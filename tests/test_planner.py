"""keras_glam.distribution.plan and propose_mesh: per-device memory and traffic from a config."""

import math

import numpy as np
import pytest

import keras_glam
from keras_glam import distribution as glam_distribution
from keras_glam.training.adafactor import GLaMAdafactor

GIB = 2**30
# Big enough for Adafactor to factor (both of the two largest dims >= 128), small to build.
FACTORED_CONFIG = {
    "vocabulary_size": 200,
    "num_layers": 2,
    "hidden_dim": 128,
    "intermediate_dim": 256,
    "num_heads": 2,
    "head_dim": 64,
    "num_experts": 4,
}


def _built_shapes(config):
    backbone = keras_glam.GLaMBackbone(**config)
    return {v.path: (tuple(v.shape), v.trainable) for v in backbone.weights}, backbone


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_experts": None}, {"pad_vocabulary_to_multiple_of": 8}],
    ids=["moe", "dense", "padded"],
)
def test_weight_shapes_are_those_of_the_built_model(tiny_config, overrides):
    config = {**tiny_config, **overrides}
    built, _ = _built_shapes(config)
    planned = {path: (shape, trainable) for path, shape, trainable in
               glam_distribution.glam_weight_shapes(config)}
    assert planned == built
    trainable = sum(math.prod(shape) for shape, is_trainable in planned.values() if is_trainable)
    rows = planned["token_embedding/embeddings"][0][0]
    assert trainable == keras_glam.count_params(config, vocabulary_size=rows)[0]


def test_parameter_and_gradient_bytes_on_an_expert_axis(tiny_config):
    # V=97, L=3 (MoE on 0 and 2), M=16, H=32, N=2, Dh=8, E=4, k=2; float32; 4 expert devices.
    v, m, h, n, dh, e, k = 97, 16, 32, 2, 8, 4, 2
    shared = v * m + 3 * (2 * m + 4 * m * n * dh + n * 32) + m
    experts_per_device = 2 * (2 * e * m * h) // 4
    router = 2 * m * e
    dense_ffn = 3 * m * h
    statistics = 2 * (e + k)

    report = glam_distribution.plan(tiny_config, {"expert": 4}, batch_tokens=4 * 16,
                                    sequence_length=16, dtype="float32")
    assert report.parameter_bytes == 4 * (shared + experts_per_device + router + dense_ffn
                                          + statistics)
    assert report.gradient_bytes == 4 * (shared + experts_per_device + router + dense_ffn)
    assert report.problems == ()


def test_parameter_bytes_on_one_device_equal_the_built_model(tiny_config):
    _, backbone = _built_shapes(tiny_config)
    report = glam_distribution.plan(tiny_config, {}, batch_tokens=16, sequence_length=16,
                                    dtype="float32")
    assert report.parameter_bytes == sum(
        math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in backbone.weights
    )


def test_optimizer_bytes_equal_the_slots_glam_adafactor_creates():
    _, backbone = _built_shapes(FACTORED_CONFIG)
    optimizer = GLaMAdafactor()
    optimizer.build(backbone.trainable_variables)
    slot_sizes = {
        v.path: math.prod(v.shape) * 4
        for v in optimizer.variables
        if "second_moment" in v.path
    }
    report = glam_distribution.plan(FACTORED_CONFIG, {}, batch_tokens=128, sequence_length=128)
    assert report.optimizer_bytes == sum(slot_sizes.values())
    # The two expert kernels of layer 0, [4, 128, 256] and [4, 256, 128], are each factored
    # into [4, 128] and [4, 256] float32 slots, which the expert axis splits.
    expert_slots = sum(size for path, size in slot_sizes.items() if "expert_w" in path)
    assert expert_slots == 2 * 4 * (128 + 256) * 4
    split = glam_distribution.plan(
        FACTORED_CONFIG, {"expert": 4}, batch_tokens=512, sequence_length=128
    )
    assert split.optimizer_bytes == report.optimizer_bytes - expert_slots * 3 // 4


def test_all_to_all_bytes_follow_gshard_accounting(tiny_config):
    # 64 tokens per device, one group each: C = int(64 * 2.0 / 4) = 32, so E * C = cf * S.
    mesh = {"data": 2, "expert": 4}
    report = glam_distribution.plan(tiny_config, mesh, batch_tokens=8 * 64, sequence_length=64)
    assert (report.tokens_per_device, report.group_size, report.capacity) == (64, 64, 32)
    per_layer = 2.0 * 64 * 16 * 2 * (4 - 1) / 4  # cf * S * M * bf16 bytes * (P - 1) / P
    assert report.all_to_all_bytes == 4 * report.num_moe_layers * per_layer
    remat = glam_distribution.plan(tiny_config, mesh, batch_tokens=8 * 64, sequence_length=64,
                                   remat=True)
    assert remat.all_to_all_bytes == 6 * report.num_moe_layers * per_layer
    no_expert_axis = glam_distribution.plan(tiny_config, {"data": 8}, batch_tokens=8 * 64,
                                            sequence_length=64)
    assert no_expert_axis.all_to_all_bytes == 0


def test_activations_scale_with_tokens_and_shrink_with_remat(tiny_config):
    def activations(batch_tokens, groups, remat=False):
        return glam_distribution.plan(
            tiny_config, {"expert": 4}, batch_tokens=batch_tokens, sequence_length=64,
            num_routing_groups=groups, remat=remat,
        ).activation_bytes

    assert activations(512, 8) * 2 == activations(1024, 16)
    assert activations(512, 8, remat=True) < activations(512, 8)


def test_layouts_that_do_not_divide_are_reported_with_their_fix(tiny_config):
    report = glam_distribution.plan(tiny_config, {"model": 4}, batch_tokens=1000,
                                    sequence_length=16, device_memory_gib=1.0)
    problems = "\n".join(report.problems)
    assert "attention/query/kernel" in problems  # 2 heads over 4 devices
    assert "pad_vocabulary_to_multiple_of" in problems  # 97 rows over 4 devices
    assert "not whole sequences" in problems
    assert report.fits is False
    assert "problem:" in str(report)


def test_plan_rejects_bad_arguments(tiny_config):
    with pytest.raises(ValueError, match="Unknown mesh axes"):
        glam_distribution.plan(tiny_config, {"pipeline": 2}, batch_tokens=16)
    with pytest.raises(ValueError, match="Unknown preset"):
        glam_distribution.plan("glam_1000b", {}, batch_tokens=16)
    with pytest.raises(ValueError, match="batch_tokens"):
        glam_distribution.plan(tiny_config, {}, batch_tokens=0)
    with pytest.raises(TypeError, match="GLaMAdafactor"):
        glam_distribution.plan(tiny_config, {}, batch_tokens=16, optimizer="adam")


def test_glam_64b_64e_fits_512_tpu_v4_chips_but_not_256():
    # 512 chips (Cloud TPU's v4-1024 slice): experts over 64, heads and H over 8, the dense
    # weights also over the expert axis (fsdp), layer remat, 512 sequences of 1024 per step.
    fits = glam_distribution.plan(
        "glam_64b_64e", {"data": 1, "expert": 64, "model": 8}, batch_tokens=2**19,
        fsdp=True, remat=True, device_memory_gib=32,
    )
    assert fits.fits is True
    assert fits.total_bytes < 32 * GIB
    # Every big weight is split 512 ways; only the routers and norms are whole on each chip.
    assert fits.parameter_bytes == pytest.approx(fits.total_params * 4 / 512, rel=0.01)
    assert "mesh data=1 x expert=64 x model=8, fsdp" in str(fits)
    assert "fits" in str(fits)

    # GLaM's ~1M tokens per step: 1,024 chips with a data axis of 2, the same per-chip load.
    paper_batch = glam_distribution.plan(
        "glam_64b_64e", {"data": 2, "expert": 64, "model": 8}, batch_tokens=2**20,
        fsdp=True, remat=True, device_memory_gib=32,
    )
    assert paper_batch.fits is True
    assert paper_batch.total_bytes == fits.total_bytes

    # 256 chips (v4-512): float32 weights and gradients alone exceed 32 GiB per chip.
    too_small = glam_distribution.plan(
        "glam_64b_64e", {"data": 1, "expert": 64, "model": 4}, batch_tokens=2**18,
        fsdp=True, remat=True, device_memory_gib=32,
    )
    assert too_small.parameter_bytes + too_small.gradient_bytes > 32 * GIB
    assert too_small.fits is False
    assert "does NOT fit" in str(too_small)


def test_propose_mesh_prefers_expert_parallelism():
    assert glam_distribution.propose_mesh(8, "glam_tiny_8e") == {
        "data": 1, "expert": 8, "model": 1, "fsdp": False,
    }
    assert glam_distribution.propose_mesh(8, "glam_tiny_dense") == {
        "data": 8, "expert": 1, "model": 1, "fsdp": False,
    }
    assert glam_distribution.propose_mesh(32, "glam_tiny_8e") == {
        "data": 4, "expert": 8, "model": 1, "fsdp": False,
    }


def test_propose_mesh_finds_a_fitting_mesh_or_says_why():
    proposal = glam_distribution.propose_mesh(
        512, "glam_64b_64e", batch_tokens=2**19, device_memory_gib=32, remat=True
    )
    mesh = {axis: proposal[axis] for axis in ("data", "expert", "model")}
    report = glam_distribution.plan("glam_64b_64e", mesh, batch_tokens=2**19, remat=True,
                                    fsdp=proposal["fsdp"], device_memory_gib=32)
    assert report.fits is True
    assert proposal["expert"] == 64
    with pytest.raises(ValueError, match="No data x expert x model mesh of 256 devices"):
        glam_distribution.propose_mesh(
            256, "glam_64b_64e", batch_tokens=2**18, device_memory_gib=32, remat=True
        )
