"""Callbacks that make GLaM training visible: skipped steps, throughput, expert load, checkpoints.

Put these callbacks *before* `keras.callbacks.TensorBoard` (and any other logger) in the list
given to `fit`: they add entries to the shared `logs` dict, which Keras then hands to the later
callbacks and to the progress bar (Keras appends its `ProgbarLogger` last).
"""

import math
import time

import keras
import numpy as np


class TrainingProgress(keras.callbacks.Callback):
    """Logs `skipped_steps` and `tokens_per_second`, and keeps per-step loss history.

    Every batch end, `logs` gains `skipped_steps` (the total counted by a `SkipNonFiniteSteps`
    optimizer, if the model has one) and, given `tokens_per_step`, `tokens_per_second`: tokens
    of the steps since the first step of the epoch, divided by the time since that step ended,
    so compilation and the input pipeline's start-up are left out (the epoch's first step reports
    its own time). Epoch-end logs get the same two entries, for TensorBoard.

    `step_history` records `(global_step, loss)` for every step, the per-step loss recovered from
    Keras' running mean (`k * mean_k - (k - 1) * mean_(k-1)` within an epoch); a non-finite
    running mean gives NaN entries until the epoch ends.

    Args:
        tokens_per_step: int or None, tokens in one training batch (`batch_size * length`).
        initial_step: int, the global step of the first batch of the next `fit` call.
        loss_key: the running-mean log entry whose per-step values are recorded.

    Example:
    ```python
    progress = TrainingProgress(tokens_per_step=16 * 128)
    lm.fit(dataset, steps_per_epoch=100, epochs=2,
           callbacks=[progress, keras.callbacks.TensorBoard("logs", update_freq=10)])
    steps, losses = zip(*progress.step_history)
    ```
    """

    def __init__(self, tokens_per_step=None, initial_step=0, loss_key="loss"):
        super().__init__()
        self.tokens_per_step = tokens_per_step
        self.global_step = initial_step
        self.loss_key = loss_key
        self.step_history = []
        self.tokens_per_second = float("nan")
        self._epoch_start = None
        self._first_step_end = None
        self._previous_mean = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._first_step_end = None
        self._previous_mean = None

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        self.global_step += 1
        if logs is None:
            return
        steps_in_epoch = batch + 1
        if self._first_step_end is None:
            self._first_step_end = now
            elapsed, steps = now - self._epoch_start, 1
        else:
            elapsed, steps = now - self._first_step_end, steps_in_epoch - 1
        if self.tokens_per_step:
            self.tokens_per_second = self.tokens_per_step * steps / max(elapsed, 1e-9)
            logs["tokens_per_second"] = self.tokens_per_second
        skipped = skipped_steps(self.model)
        if skipped is not None:
            logs["skipped_steps"] = skipped
        mean = logs.get(self.loss_key)
        if mean is not None:
            previous = self._previous_mean if self._previous_mean is not None else 0.0
            step_value = steps_in_epoch * mean - (steps_in_epoch - 1) * previous
            self.step_history.append((self.global_step, float(step_value)))
            self._previous_mean = mean

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if self.tokens_per_step and not math.isnan(self.tokens_per_second):
            logs["tokens_per_second"] = self.tokens_per_second
        skipped = skipped_steps(self.model)
        if skipped is not None:
            logs["skipped_steps"] = skipped


class ExpertLoadRecorder(keras.callbacks.Callback):
    """Records each MoE layer's share of routed tokens per expert, averaged over each epoch.

    Reads `expert_load` (choices routed per expert in the last training step) of every
    `MoEFeedForward` in `model.backbone.moe_layers` at each batch end. `history` holds one
    `(global_step, fractions)` entry per epoch, `fractions` a `[num_moe_layers, E]` array whose
    rows sum to 1 (uniform routing is `1 / E` everywhere).

    Args:
        initial_step: int, the global step of the first batch of the next `fit` call.
    """

    def __init__(self, initial_step=0):
        super().__init__()
        self.global_step = initial_step
        self.history = []
        self._sum = None

    def on_epoch_begin(self, epoch, logs=None):
        self._sum = None

    def on_train_batch_end(self, batch, logs=None):
        self.global_step += 1
        # With JAX, `self.model` writes the training state back to the variables first.
        layers = self.model.backbone.moe_layers
        if not layers:
            return
        load = np.stack([np.asarray(layer.expert_load.numpy(), "float64") for layer in layers])
        self._sum = load if self._sum is None else self._sum + load

    def on_epoch_end(self, epoch, logs=None):
        if self._sum is None:
            return
        totals = self._sum.sum(axis=1, keepdims=True)
        self.history.append((self.global_step, self._sum / np.maximum(totals, 1.0)))


class CheckpointObserver(keras.callbacks.Callback):
    """Base class for callbacks that act on every training-state checkpoint a `Trainer` writes.

    The `Trainer` calls `on_checkpoint_saved` on each of its callbacks that subclasses this one,
    right after a checkpoint directory has been atomically committed (regular saves, the first
    checkpoint of a run and the checkpoint written after a rollback). A callback that mirrors
    checkpoints elsewhere (for example pushing them to the Hugging Face Hub) overrides it.

    Example:
    ```python
    class PrintCheckpoints(CheckpointObserver):
        def on_checkpoint_saved(self, checkpoint):
            print("saved", checkpoint.path, "at step", checkpoint.step)
    ```
    """

    def on_checkpoint_saved(self, checkpoint):
        """Called with the `keras_glam.training.checkpointing.Checkpoint` just written."""


def skipped_steps(model):
    """The skipped-step count of `model.optimizer` (a `SkipNonFiniteSteps`), else None."""
    counter = getattr(getattr(model, "optimizer", None), "skipped_steps", None)
    if counter is None:
        return None
    return int(keras.ops.convert_to_numpy(counter))
