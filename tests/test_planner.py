"""keras_glam.distribution.plan and propose_mesh: per-device memory and traffic from a config."""

import math

import numpy as np
import pytest

import keras_glam
from keras_glam import distribution as glam_distribution
from keras_glam import plan as glam_plan
from keras_glam.optimizers.adafactor import GLaMAdafactor

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
    backbone = keras_glam.GLaMBackbone(**tiny_config)
    report = glam_distribution.plan(tiny_config, {}, batch_tokens=16, sequence_length=16,
                                    dtype="float32")
    assert report.parameter_bytes == sum(
        math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in backbone.weights
    )


def test_optimizer_bytes_equal_the_slots_glam_adafactor_creates():
    backbone = keras_glam.GLaMBackbone(**FACTORED_CONFIG)
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


def test_mesh_specs_as_the_command_line_writes_them(tiny_config):
    assert glam_distribution.parse_mesh_spec("data=2, expert=4") == {"data": 2, "expert": 4}
    for spec in ("data=2,data=2", "pipeline=2", "expert=0", "expert"):
        with pytest.raises(ValueError, match="axis=size pairs over the axes data, expert, model"):
            glam_distribution.parse_mesh_spec(spec)
    as_text = glam_distribution.plan(tiny_config, "data=2,expert=4", batch_tokens=8 * 16,
                                     sequence_length=16)
    assert as_text == glam_distribution.plan(tiny_config, {"data": 2, "expert": 4},
                                             batch_tokens=8 * 16, sequence_length=16)


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


# The bill, worked by hand for glam_tiny_dense on rows of 32 tokens: forward 696,576 FLOPs per
# token (tests/test_flops.py checks the counting), training 3 x = 2,089,728; on 1e12 tokens
# 2.089728e18 FLOPs = 2.089728e18 / 8.64e19 = 0.0241866... petaflop/s-days. On a chip of
# 1 TFLOP/s peak at MFU 0.25: 2.089728e18 / 2.5e11 = 8,358,912 chip-seconds = 2,321.92
# chip-hours; at 500 W and PUE 1.5, 2,321.92 h x 750 W = 1,741,440 Wh = 1.74144 MWh.
HAND_CHIP = glam_distribution.Hardware("test chip", peak_flops_per_chip=1e12,
                                       watts_per_chip=500, pue=1.5)


def test_bill_arithmetic_on_a_hand_worked_example():
    bill = glam_distribution.training_bill("glam_tiny_dense", 1e12, HAND_CHIP, mfu=0.25,
                                           num_chips=8, sequence_length=32)
    assert bill.training_flops_per_token == 2_089_728
    assert bill.total_flops == pytest.approx(2.089728e18)
    assert bill.petaflop_s_days == pytest.approx(0.0241866667, rel=1e-8)
    assert bill.chip_hours == pytest.approx(2321.92)
    assert bill.wall_hours == pytest.approx(2321.92 / 8)
    assert bill.energy_mwh == pytest.approx(1.74144)
    assert bill.six_n_flops_per_token == 6 * 344_512
    assert "MFU 25.0% (assumed)" in str(bill)


@pytest.mark.parametrize(
    "reported",
    [{"energy_mwh": 1.74144}, {"chip_hours": 2321.92}, {"hours": 290.24, "num_chips": 8}],
    ids=["energy", "chip_hours", "hours"],
)
def test_reported_energy_or_duration_implies_the_mfu(reported):
    mfu = glam_distribution.implied_mfu("glam_tiny_dense", 1e12, HAND_CHIP, sequence_length=32,
                                        **reported)
    assert mfu == pytest.approx(0.25)


def test_glam_papers_row_implies_28_percent_mfu_on_tpu_v4():
    # 456 MWh for 600B tokens, 326 W per TPU v4 chip, PUE 1.11: 1.26M chip-hours.
    bill = glam_distribution.training_bill(
        "glam_64b_64e", 600e9, glam_distribution.GLAM_TPU_V4, energy_mwh=456, num_chips=1024
    )
    assert bill.chip_hours == pytest.approx(456e6 / (326 * 1.11))
    assert bill.mfu == pytest.approx(0.2766, abs=1e-4)
    assert bill.petaflop_s_days == pytest.approx(3993, abs=1)
    # The paper's other figure, 574 h on 1,024 chips for 280B tokens, 213 MWh, agrees.
    at_280b = glam_distribution.training_bill(
        "glam_64b_64e", 280e9, glam_distribution.GLAM_TPU_V4, hours=574, num_chips=1024
    )
    assert at_280b.mfu == pytest.approx(bill.mfu, rel=0.01)
    assert at_280b.energy_mwh == pytest.approx(213, abs=1)


def test_plan_prints_the_bill_and_the_compute_optimal_size():
    report = glam_distribution.plan(
        "glam_64b_64e", {"data": 2, "expert": 64, "model": 8}, batch_tokens=2**20,
        fsdp=True, remat=True, device_memory_gib=32, training_tokens=600e9,
        hardware=glam_distribution.GLAM_TPU_V4, energy_mwh=456,
    )
    assert report.bill.num_chips == 1024
    text = str(report)
    assert "chip-hours at MFU 27.7% (implied by 456 MWh)" in text
    assert "3,993 petaflop/s-days" in text
    assert "wall-clock on 1,024 chip(s)" in text and "51.3 days" in text
    assert "456 MWh (326 W per chip, PUE 1.11)" in text
    assert "53.6B parameters on 1.07T tokens; nearest dense GLaM preset glam_137b" in text
    assert "Hoffmann et al. 2022" in text


def test_compute_optimal_size_follows_chinchilla():
    # Chinchilla itself: 70B parameters on 1.4T tokens, C = 6 N D = 5.88e23.
    size = glam_distribution.compute_optimal_size(6 * 70e9 * 1.4e12)
    assert size.parameters == pytest.approx(70e9)
    assert size.tokens == pytest.approx(1.4e12)
    # Nearest by ratio among the dense presets (glam_1.7b 1.68B, glam_8b 8.72B): 3.8B is nearer
    # to 1.68B (x 2.27) than to 8.72B (x 2.29); 3.9B is not. The MoE presets are not candidates.
    def nearest(parameters):
        return glam_distribution.compute_optimal_size(120 * parameters**2).nearest_preset

    assert (nearest(3.8e9), nearest(3.9e9), nearest(9.8e9)) == ("glam_1.7b", "glam_8b", "glam_8b")


def test_bill_rejects_incomplete_or_conflicting_inputs():
    with pytest.raises(ValueError, match="exactly one of mfu= .* got mfu, energy_mwh"):
        glam_distribution.training_bill("glam_tiny_dense", 1e9, HAND_CHIP, mfu=0.5,
                                        energy_mwh=1.0)
    with pytest.raises(ValueError, match="watts_per_chip"):
        glam_distribution.training_bill("glam_tiny_dense", 1e9,
                                        glam_distribution.Hardware("tpu_v4"), energy_mwh=1.0)
    with pytest.raises(ValueError, match="give num_chips"):
        glam_distribution.training_bill("glam_tiny_dense", 1e9, HAND_CHIP, hours=3.0)
    with pytest.raises(ValueError, match="need the hardware"):
        glam_distribution.training_bill("glam_tiny_dense", 1e9, mfu=0.5)
    with pytest.raises(ValueError, match=r"`mfu` must be in \(0, 1\]"):
        glam_distribution.training_bill("glam_tiny_dense", 1e9, HAND_CHIP, mfu=40)
    with pytest.raises(ValueError, match="No peak FLOP/s known for chip 'tpu_v9'.*tpu_v5p"):
        glam_distribution.Hardware("tpu_v9")


def test_glam_plan_command(capsys):
    assert glam_plan.main([
        "glam_64b_64e", "--mesh", "data=2,expert=64,model=8", "--batch-tokens", "1048576",
        "--fsdp", "--remat", "--tokens", "600e9", "--chip", "tpu_v4", "--watts", "326",
        "--pue", "1.11", "--energy-mwh", "456",
    ]) == 0
    assert "MFU 27.7% (implied by 456 MWh)" in capsys.readouterr().out
    assert glam_plan.main(["--flop-budget", "5.88e23"]) == 0
    assert "a dense model of 70B parameters on 1.4T tokens" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["glam_9b"], "Unknown preset 'glam_9b'"),
        (["glam_tiny_8e", "--mesh", "pipeline=2"], "axis=size pairs"),
        (["glam_tiny_8e", "--mfu", "0.3"], "need --chip or --peak-tflops"),
        ([], "Name a preset"),
        (["glam_tiny_8e", "--tokens", "many"], "expected a number"),
    ],
)
def test_glam_plan_bad_input_exits_2_with_one_line(capsys, argv, message):
    try:
        code = glam_plan.main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    assert code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
