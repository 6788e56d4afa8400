"""keras_glam.training.compute_meter: model FLOP/s per device and MFU while training."""

import math
import types

import keras
import numpy as np
import pytest

from keras_glam.models.flops import training_flops_per_token
from keras_glam.training import compute_meter
from keras_glam.training.compute_meter import ComputeMeter


class FakeClock:
    def __init__(self, times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def test_mfu_against_a_given_peak_with_a_fake_clock():
    # 6 GFLOP per step on 2 devices of 10 GFLOP/s peak each.
    meter = ComputeMeter(6e9, num_devices=2, peak_flops_per_device=1e10,
                         clock=FakeClock([10.0, 10.5, 11.5, 50.0, 51.0, 53.0]))
    meter.on_train_begin()
    meter.on_epoch_begin(0)
    first = {}
    meter.on_train_batch_end(0, first)  # its time holds compilation: not measured
    assert first == {}
    logs = {}
    meter.on_train_batch_end(1, logs)  # 1 step in 0.5 s: 12 GFLOP/s, 6 per device
    assert logs == pytest.approx({"tflops_per_device": 6e-3, "mfu": 0.6})
    meter.on_train_batch_end(2, logs)  # 2 steps in 1.5 s: 8 GFLOP/s, 4 per device
    assert logs == pytest.approx({"tflops_per_device": 4e-3, "mfu": 0.4})
    epoch_logs = {"loss": 1.0}
    meter.on_epoch_end(0, epoch_logs)
    assert epoch_logs == pytest.approx({"loss": 1.0, "tflops_per_device": 4e-3, "mfu": 0.4})

    # The gap between epochs (evaluation, checkpoints) is left out: 50.0 starts afresh.
    meter.on_epoch_begin(1)
    meter.on_train_batch_end(0, {})
    meter.on_train_batch_end(1, logs)  # 1 step in 1 s: 6 GFLOP/s, 3 per device
    assert logs["mfu"] == pytest.approx(0.3)
    summary = meter.summary()  # the run: 3 steps in 2.5 s
    assert summary["tflops_per_device"] == pytest.approx(6e9 * 3 / 2.5 / 2 / 1e12)
    assert summary["mfu"] == pytest.approx(0.36)
    assert summary["peak_source"] == "given"
    assert summary["num_devices"] == 2


def test_measured_peak_is_labelled_and_shared_by_the_host_devices():
    # The matmul of side 64 (2 * 64^3 FLOPs) is timed with the fake clock: 1 ms per run.
    ticks = [0.0, 0.001, 1.0, 1.001, 2.0, 2.001]
    meter = ComputeMeter(2 * 64**3, num_devices=4, measure_size=64,
                         clock=FakeClock(ticks + [5.0, 5.004]))
    meter.on_train_begin()
    assert meter.peak_flops_per_device == pytest.approx(2 * 64**3 / 0.001 / 4)
    assert meter.peak_source.startswith("measured: 64x64 float32 matmul on")
    meter.on_epoch_begin(0)
    meter.on_train_batch_end(0, {})
    logs = {}
    meter.on_train_batch_end(1, logs)  # one step: 4 ms for what the host does in 1 ms
    assert set(logs) == {"tflops_per_device", "mfu_vs_measured_peak"}
    assert logs["mfu_vs_measured_peak"] == pytest.approx(0.25)


def test_the_measured_peak_is_the_best_timing_of_every_fit():
    """A timing taken while other tenants load the host understates the peak: later timings
    (each fit's start and end) raise it, and the run's MFU uses the best."""
    slow = [0.0, 0.004, 1.0, 1.004, 2.0, 2.004]  # 4 ms per matmul: a loaded machine
    fast = [3.0, 3.001, 4.0, 4.001, 5.0, 5.001]  # 1 ms per matmul
    meter = ComputeMeter(2 * 64**3, num_devices=1, measure_size=64, clock=FakeClock(slow + fast))
    meter.on_train_begin()
    assert meter.peak_flops_per_device == pytest.approx(2 * 64**3 / 0.004)
    meter.on_train_end()
    assert meter.peak_flops_per_device == pytest.approx(2 * 64**3 / 0.001)


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA A10G", None),
        ("cpu", None),
    ],
)
def test_peak_table_reads_jax_device_kinds(kind, peak):
    assert compute_meter.peak_flops_per_chip(kind) == peak


def test_for_glam_counts_the_training_flops_of_a_batch(tiny_config):
    backbone = types.SimpleNamespace(get_config=lambda: tiny_config)  # what for_glam reads
    meter = ComputeMeter.for_glam(types.SimpleNamespace(backbone=backbone), batch_size=4,
                                  sequence_length=16, peak_flops_per_device=1e12)
    assert meter.flops_per_step == 4 * 16 * training_flops_per_token(tiny_config, 16)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="`flops_per_step` must be positive"):
        ComputeMeter(0)
    with pytest.raises(ValueError, match="`peak_flops_per_device` must be positive"):
        ComputeMeter(1e9, peak_flops_per_device=-1)


def test_logs_reach_history_in_a_real_fit():
    # Any Keras model: the meter needs only the FLOPs of a step (here 2 * 32 * 8 * 4 forward).
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(128, 8)), rng.normal(size=(128, 4))
    meter = ComputeMeter(3 * 2 * 32 * 8 * 4, measure_size=256)
    history = model.fit(x, y, batch_size=32, epochs=2, callbacks=[meter], shuffle=False,
                        verbose=0)
    assert meter.peak_source.startswith("measured: 256x256 float32 matmul on cpu")
    for key in ("tflops_per_device", "mfu_vs_measured_peak"):
        assert len(history.history[key]) == 2
        assert all(value > 0 and math.isfinite(value) for value in history.history[key])
    summary = meter.summary()
    assert summary["num_devices"] == 1
    assert summary["mfu_vs_measured_peak"] > 0
