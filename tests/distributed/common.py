"""Shared set-up of the distribution checks that run in their own process.

`XLA_FLAGS=--xla_force_host_platform_device_count=N` only works before JAX is imported, so each
check is a script launched by the tests in a fresh interpreter; it prints one line
`RESULT {json}` that the test asserts on. Import this module first and call `use_cpu_devices`
before importing keras or jax.
"""

import json
import os
import sys

# A GLaM small enough to compile in seconds: MoE on layers 0 and 2, 8 experts, two heads, and
# sizes that no other tensor of the model shares, so the expert kernels [8, 24, 40] and
# [8, 40, 24] are recognisable in compiled programs.
CONFIG = {
    "vocabulary_size": 97,
    "num_layers": 3,
    "hidden_dim": 24,
    "intermediate_dim": 40,
    "num_heads": 2,
    "head_dim": 8,
    "num_experts": 8,
    "capacity_factor": 2.0,
    "dispatch": "einsum",
}
BATCH_ROWS = 8
SEQUENCE_LENGTH = 16


def use_cpu_devices(count):
    """Simulate `count` CPU devices; must run before JAX is imported."""
    if "jax" in sys.modules:
        raise RuntimeError("use_cpu_devices() must run before jax is imported.")
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def token_batch(seed, rows=BATCH_ROWS, length=SEQUENCE_LENGTH):
    """`(inputs, labels, sample_weight)` of random tokens; the last row ends in padding."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CONFIG["vocabulary_size"], size=(rows, length + 1)).astype("int32")
    padding_mask = np.ones((rows, length), "int32")
    padding_mask[-1, length // 2 :] = 0
    inputs = {"token_ids": tokens[:, :-1] * padding_mask, "padding_mask": padding_mask}
    return inputs, tokens[:, 1:] * padding_mask, padding_mask.astype("float32")


def build_causal_lm(seed, **overrides):
    """A `GLaMCausalLM` with `CONFIG` (and `overrides`), initialised from `seed`."""
    import keras

    import keras_glam

    keras.utils.set_random_seed(seed)
    return keras_glam.GLaMCausalLM(keras_glam.GLaMBackbone(**{**CONFIG, **overrides}))


def step_loss_recorder():
    """A Keras callback whose `losses` list gets each training step's cross-entropy."""
    import keras

    class StepLosses(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.losses = []

        def on_train_batch_end(self, batch, logs=None):
            self.losses.append(float(logs["cross_entropy"]))

    return StepLosses()


def emit(result):
    print("RESULT " + json.dumps(result), flush=True)
