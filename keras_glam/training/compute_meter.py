"""Model FLOP/s per device and MFU while training, against the accelerator's peak.

MFU (model FLOPs utilisation, Chowdhery et al. 2022) is the model's FLOPs per second
(`keras_glam.models.flops.training_flops_per_token` times tokens per second: the FLOPs the model
needs, not what the hardware happened to execute) over the device's peak. Peaks are dense
bfloat16 matmul FLOP/s per chip from the vendors' data sheets (`ACCELERATOR_PEAK_FLOPS`). A CPU
has no such number: there the meter times one large float32 matmul when each `fit` starts and
ends, compares with the best rate measured, and its log key says so (`mfu_vs_measured_peak`).
"""

import math
import re
import time

import keras
import numpy as np

from keras_glam.models.flops import training_flops_per_token

# Dense bfloat16 matmul FLOP/s per chip (data sheets; no structured sparsity). V100 has no
# bfloat16: its float16 tensor-core peak.
ACCELERATOR_PEAK_FLOPS = {
    "tpu_v4": 275e12,
    "tpu_v5e": 197e12,
    "tpu_v5p": 459e12,
    "tpu_v6e": 918e12,
    "v100": 125e12,
    "a100": 312e12,
    "a10": 125e12,
    "l4": 121e12,
    "h100_pcie": 756e12,
    "h100": 989e12,
    "h200": 989e12,
    "b200": 2250e12,
}
# JAX `device_kind` strings ("TPU v5 lite", "NVIDIA H100 80GB HBM3") to table names; first match.
_DEVICE_KINDS = (
    (r"tpu v4", "tpu_v4"),
    (r"tpu v5 ?(lite|e)", "tpu_v5e"),
    (r"tpu v5p?$", "tpu_v5p"),
    (r"tpu v6 ?(lite|e)", "tpu_v6e"),
    (r"v100", "v100"),
    (r"a100", "a100"),
    (r"\ba10\b", "a10"),
    (r"\bl4\b", "l4"),
    (r"h100 pcie", "h100_pcie"),
    (r"h100", "h100"),
    (r"h200", "h200"),
    (r"b200", "b200"),
)


def peak_flops_per_chip(chip):
    """Dense bfloat16 peak FLOP/s of `chip`, or None when unknown.

    Args:
        chip: a name of `ACCELERATOR_PEAK_FLOPS` (`"tpu_v4"`) or a JAX `device_kind`
            (`"TPU v5 lite"`, `"NVIDIA H100 80GB HBM3"`).

    Example:

    >>> peak_flops_per_chip("tpu_v4"), peak_flops_per_chip("TPU v5 lite")
    (275000000000000.0, 197000000000000.0)
    """
    if chip in ACCELERATOR_PEAK_FLOPS:
        return ACCELERATOR_PEAK_FLOPS[chip]
    kind = str(chip).strip().lower()
    for pattern, name in _DEVICE_KINDS:
        if re.search(pattern, kind):
            return ACCELERATOR_PEAK_FLOPS[name]
    return None


def measure_matmul_flops(size=2048, dtype="float32", repeats=3, clock=time.perf_counter):
    """FLOP/s of a `size x size` matmul on the default device, the best of `repeats` runs.

    One run first compiles and warms up. `2 * size**3` FLOPs per run.
    """
    a = keras.ops.convert_to_tensor(np.random.default_rng(0).normal(size=(size, size)), dtype)
    keras.ops.convert_to_numpy(keras.ops.matmul(a, a))
    best = math.inf
    for _ in range(repeats):
        start = clock()
        keras.ops.convert_to_numpy(keras.ops.matmul(a, a))
        best = min(best, clock() - start)
    return 2 * size**3 / max(best, 1e-12)


def _device_kind():
    if keras.backend.backend() == "jax":
        import jax

        device = jax.devices()[0]
        return device.platform, device.device_kind
    return "cpu", "cpu"


def _devices_in_use():
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    return math.prod(distribution.device_mesh.shape)


class ComputeMeter(keras.callbacks.Callback):
    """Logs model TFLOP/s per device and MFU, in the progress bar, TensorBoard and `History`.

    Every batch end, `logs` gains `tflops_per_device`: the model's training FLOPs of the steps
    since the first step of the epoch, per device, over the time since that step ended (so
    compilation, evaluation and checkpointing between epochs are left out), in TFLOP/s; and
    `mfu`, that rate over the device's peak. With a peak measured at start-up (CPUs, unknown
    devices) the key is `mfu_vs_measured_peak` instead. Epoch-end logs get the same entries.
    `summary()` gives the averages over the whole run, for `metrics.json`.

    Put it before `keras.callbacks.TensorBoard` in the callback list (as `Trainer` does with
    the callbacks it is given), so that the logger sees its entries.

    Args:
        flops_per_step: model FLOPs of one training step over the whole batch (forward and
            backward; `ComputeMeter.for_glam` computes it).
        num_devices: devices the step runs on; None: those of the active
            `keras.distribution`, else 1.
        peak_flops_per_device: peak FLOP/s of one device, overriding the table; None looks the
            device up in `ACCELERATOR_PEAK_FLOPS`, and measures a matmul if it is not there.
        measure_size: side of the matmul timed when the peak is measured.
        clock: a `time.perf_counter`-like function (tests pass a fake one).

    Example:
    ```python
    meter = ComputeMeter.for_glam(lm, batch_size=8, sequence_length=128)
    lm.fit(dataset, steps_per_epoch=50, epochs=4, callbacks=[meter])
    print(meter.summary())   # {"tflops_per_device": ..., "mfu_vs_measured_peak": ..., ...}
    ```
    """

    def __init__(
        self,
        flops_per_step,
        num_devices=None,
        peak_flops_per_device=None,
        measure_size=2048,
        clock=time.perf_counter,
    ):
        super().__init__()
        if not flops_per_step > 0:
            raise ValueError(f"`flops_per_step` must be positive, got {flops_per_step!r}.")
        if peak_flops_per_device is not None and not peak_flops_per_device > 0:
            raise ValueError(
                "`peak_flops_per_device` must be positive (FLOP/s of one device, e.g. 275e12 "
                f"for TPU v4), got {peak_flops_per_device!r}."
            )
        self.flops_per_step = flops_per_step
        self.num_devices = num_devices
        self.peak_flops_per_device = peak_flops_per_device
        self.peak_source = None if peak_flops_per_device is None else "given"
        self.measure_size = measure_size
        self.clock = clock
        self._last_step_end = None
        self._epoch_steps = self._epoch_seconds = 0
        self._run_steps = self._run_seconds = 0

    @classmethod
    def for_glam(cls, model, batch_size, sequence_length, **kwargs):
        """A meter for a `GLaMCausalLM` or `GLaMBackbone` training on `batch_size` rows of
        `sequence_length` tokens; other keyword arguments go to the constructor."""
        backbone = getattr(model, "backbone", model)
        per_token = training_flops_per_token(backbone.get_config(), sequence_length)
        return cls(per_token * batch_size * sequence_length, **kwargs)

    @property
    def mfu_key(self):
        measured = (self.peak_source or "").startswith("measured")
        return "mfu_vs_measured_peak" if measured else "mfu"

    def on_train_begin(self, logs=None):
        if self.num_devices is None:
            self.num_devices = _devices_in_use()
        if self.peak_source is None:
            platform, kind = _device_kind()
            peak = peak_flops_per_chip(kind) if platform != "cpu" else None
            if peak is not None:
                self.peak_flops_per_device = peak
                self.peak_source = f"data sheet: {kind} (bfloat16)"
                return
            self.peak_source = (
                f"measured: {self.measure_size}x{self.measure_size} float32 matmul on {kind}"
            )
        if self.mfu_key == "mfu_vs_measured_peak":
            self._measure_peak()

    def on_train_end(self, logs=None):
        if self.mfu_key == "mfu_vs_measured_peak":
            self._measure_peak()

    def _measure_peak(self):
        """Time the matmul again and keep the best rate seen: on a shared machine one timing can
        catch other tenants' load and understate the peak (and overstate the MFU)."""
        # The devices of one host share its cores: each gets an equal part of the host's rate.
        measured = measure_matmul_flops(self.measure_size, clock=self.clock) / self.num_devices
        self.peak_flops_per_device = max(self.peak_flops_per_device or 0.0, measured)

    def on_epoch_begin(self, epoch, logs=None):
        self._last_step_end = None
        self._epoch_steps = self._epoch_seconds = 0

    def on_train_batch_end(self, batch, logs=None):
        now = self.clock()
        if self._last_step_end is not None:
            self._epoch_steps += 1
            self._epoch_seconds += now - self._last_step_end
            self._run_steps += 1
            self._run_seconds += now - self._last_step_end
        self._last_step_end = now
        self._log(logs, self._epoch_steps, self._epoch_seconds)

    def on_epoch_end(self, epoch, logs=None):
        self._log(logs, self._epoch_steps, self._epoch_seconds)

    def summary(self):
        """Averages over every measured step of the run, and the peak they are compared with."""
        values = self._rates(self._run_steps, self._run_seconds) or {
            "tflops_per_device": math.nan, self.mfu_key: math.nan,
        }
        return {
            **values,
            "peak_tflops_per_device": (self.peak_flops_per_device or math.nan) / 1e12,
            "peak_source": self.peak_source,
            "model_flops_per_step": self.flops_per_step,
            "num_devices": self.num_devices,
        }

    def _rates(self, steps, seconds):
        if not steps or seconds <= 0:
            return None
        per_device = self.flops_per_step * steps / seconds / self.num_devices
        return {
            "tflops_per_device": per_device / 1e12,
            self.mfu_key: per_device / self.peak_flops_per_device,
        }

    def _log(self, logs, steps, seconds):
        rates = self._rates(steps, seconds)
        if logs is not None and rates is not None:
            logs.update(rates)
