"""A fault-tolerant training driver: `fit` in checkpointed chunks, exact resume, rollback.

`Trainer` runs Keras' own `model.fit` with one *epoch* per checkpoint interval. The data stream
of a run is a function of `(seed, data_stream)` and is entered at `data_position` (batches
already consumed), so a training state is fully described by the model's variables, the
optimizer's variables, a few integers and, for streamed data, the stream's own saved state;
those are written as an atomic checkpoint after every healthy chunk
(`keras_glam.training.checkpointing`). Resuming after a crash and rolling back after divergence
are then the same operation: restore a checkpoint, rebuild the stream, enter it at the position.
Training itself is deterministic (no dropout; GShard routing has no noise), so a run killed with
`kill -9` and resumed ends with the same weights as an uninterrupted run.

The data comes in one of two ways:

- a *streaming data* object (`keras_glam.data.StreamingData`, or anything whose
  `training_iterator(seed)` returns a `keras_glam.data.DataIterator`): every checkpoint holds
  the iterator's state (`DataIterator.save`: read positions, shuffle buffers, batches pulled
  ahead), and resuming restores it, so nothing consumed before the checkpoint is read again;
- a callable `make_dataset(seed, skip_batches)`: resuming rebuilds the stream and skips
  `data_position` batches (which reads and discards them: cheap for small corpora only).

Health checks, after GLaM's and PaLM's practice (skip bad steps; on a loss spike restart from an
earlier healthy checkpoint and skip the batches around the spike; PaLM, Chowdhery et al. 2022,
section 5.1, skipped 200 to 500 batches):

- `max_consecutive_skipped_steps` skipped steps in a row (non-finite gradients) end the chunk;
- a chunk whose mean training cross-entropy exceeds `loss_spike_factor` times that of the last
  healthy chunk, or in which every step was skipped, is a failure;
- after a failure, training rolls back to the newest checkpoint's weights and continues the same
  data stream from where the failing chunk stopped: the batches between that checkpoint and the
  failure are skipped, not read again (nothing is re-read from the corpus's start either); a
  second failure in a row goes one checkpoint further back; more than `max_rollbacks`
  rollbacks in one run raise `TrainingDivergedError`.
"""

import contextlib
import dataclasses
import logging
import math
import typing

import keras
import numpy as np

from keras_glam.training.callbacks import CheckpointObserver
from keras_glam.training.callbacks import ExpertLoadRecorder
from keras_glam.training.callbacks import TrainingProgress
from keras_glam.training.callbacks import skipped_steps
from keras_glam.training.checkpointing import CheckpointManager
from keras_glam.utils.checks import check_positive_integers

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """Training kept failing its health checks after the allowed number of rollbacks."""


@dataclasses.dataclass
class TrainingState:
    """Everything besides the variables that a checkpoint must hold to continue exactly.

    Attributes:
        step: training steps done (applied or skipped), the global step.
        data_position: batches consumed (trained on or skipped by a rollback) from the data
            stream; after a rollback it runs ahead of `step`.
        data_stream: which data order is in use. Rollbacks keep it (they skip ahead in it);
            runs checkpointed before that moved to the next stream on each rollback.
        seed: the run's seed; stream `s` is seeded with `data_seed(seed, s)`.
        rollbacks: rollbacks so far in this run.
        consecutive_failures: failed chunks since the last healthy one.
        rollback_step: the step the last rollback went back to (a second failure in a row goes
            further back than this), or None.
        last_healthy_cross_entropy: mean training cross-entropy of the last healthy chunk.
        chunk_logs: one dict of Keras epoch logs (with `step`) per healthy chunk.
        step_losses: `[step, loss]` of every step of the healthy chunks.
        expert_load: `[step, fractions]` per healthy chunk, `fractions` `[MoE layers][E]`.
        events: human-readable notes (rollbacks).
    """

    step: int = 0
    data_position: int = 0
    data_stream: int = 0
    seed: int = 0
    rollbacks: int = 0
    consecutive_failures: int = 0
    rollback_step: int | None = None
    last_healthy_cross_entropy: float | None = None
    chunk_logs: list = dataclasses.field(default_factory=list)
    step_losses: list = dataclasses.field(default_factory=list)
    expert_load: list = dataclasses.field(default_factory=list)
    events: list = dataclasses.field(default_factory=list)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """The state a checkpoint recorded; unknown keys are ignored, missing ones default.

        Raises:
            ValueError: `values` is not a dict or a field has the wrong type, named.
        """
        if not isinstance(values, dict):
            raise ValueError(f"a training state is a dict, got {type(values).__name__}")
        fields = dataclasses.fields(cls)
        for field in fields:
            if field.name in values and not _has_type(values[field.name], field.type):
                raise ValueError(
                    f"'{field.name}' is {values[field.name]!r}, not of type {field.type}"
                )
        return cls(**{field.name: values[field.name] for field in fields if field.name in values})


def _has_type(value, annotation):
    """Whether a JSON value fits a field annotation (`int`, `float | None`, `list`, ...); an int
    fits `float`, a bool fits nothing but `bool`."""
    kinds = typing.get_args(annotation) or (annotation,)
    if isinstance(value, bool):
        return bool in kinds
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, kinds)


@dataclasses.dataclass
class ChunkFailure:
    """A chunk that failed its health checks.

    Attributes:
        reason: what failed, for the events and messages.
        data_position: the data position the failing chunk reached (batches trained on in it
            counted); the rollback continues the stream there.
    """

    reason: str
    data_position: int

    def __str__(self):
        return self.reason


def data_seed(seed, data_stream):
    """The seed of data stream `data_stream` of a run seeded with `seed` (independent streams)."""
    return int(np.random.SeedSequence([seed, data_stream]).generate_state(1)[0] & 0x7FFFFFFF)


class Trainer:
    """Trains a compiled `GLaMCausalLM` (or any Keras LM) with checkpoints, resume and rollback.

    Args:
        model: a compiled Keras model taking `{"token_ids", "padding_mask"}` batches.
        data: the training batches, `(x, y, sample_weight)`, endless and deterministic given a
            seed, as either
            - a streaming data object with `training_iterator(seed)` returning a
              `keras_glam.data.DataIterator` (e.g. `keras_glam.data.StreamingData`): its state
              goes into every checkpoint and resuming continues it without reading again; or
            - a callable `(seed, skip_batches) -> tf.data.Dataset` (e.g.
              `functools.partial(keras_glam.data.packed_lm_dataset, ..., repeat=True)` called
              as `make_dataset(seed=..., skip_batches=...)`): resuming skips batches.
        total_steps: int, training steps of the whole run.
        checkpoint_dir: directory of the training-state checkpoints.
        checkpoint_interval: int, steps per chunk (one Keras epoch) and between checkpoints.
        max_checkpoints: int, checkpoints kept (the newest ones).
        seed: int, seeds the data streams.
        validation_data: optional dataset evaluated at the end of every chunk (`val_*` logs).
        resume: bool. True continues from the newest valid checkpoint in `checkpoint_dir` (or
            starts if there is none); False refuses a directory that already holds checkpoints.
        max_consecutive_skipped_steps: int, skipped steps in a row that fail a chunk.
        loss_spike_factor: float > 1, see the module docstring.
        max_rollbacks: int, rollbacks allowed in one run.
        callbacks: more Keras callbacks, called after the trainer's own (so a
            `keras.callbacks.TensorBoard` here sees `skipped_steps` and `tokens_per_second`).
            Callbacks subclassing `CheckpointObserver` also hear of every checkpoint.
        verbose: `fit` verbosity (`"auto"`, 0, 1, 2).

    Example:
    ```python
    data = keras_glam.data.StreamingData.from_specs(
        ["shards/*.jsonl"], lm.preprocessor.tokenizer, sequence_length=128, batch_size=16)
    trainer = Trainer(lm, data, total_steps=600, checkpoint_dir="run/checkpoints",
                      checkpoint_interval=50)
    state = trainer.fit()
    ```
    """

    def __init__(
        self,
        model,
        data,
        total_steps,
        checkpoint_dir,
        *,
        checkpoint_interval=100,
        max_checkpoints=3,
        seed=0,
        validation_data=None,
        resume=True,
        max_consecutive_skipped_steps=5,
        loss_spike_factor=1.5,
        max_rollbacks=3,
        callbacks=(),
        verbose="auto",
    ):
        check_positive_integers(
            total_steps=total_steps,
            checkpoint_interval=checkpoint_interval,
            max_consecutive_skipped_steps=max_consecutive_skipped_steps,
        )
        if not (isinstance(max_rollbacks, int) and max_rollbacks >= 0):
            raise ValueError(
                f"`max_rollbacks` must be an integer >= 0. Received: {max_rollbacks!r}"
            )
        if not loss_spike_factor > 1:
            raise ValueError(
                f"`loss_spike_factor` must be > 1. Received: loss_spike_factor={loss_spike_factor}"
            )
        if not getattr(model, "compiled", False):
            raise ValueError(
                "Compile the model before training: `lm.compile()` gives GLaM's recipe."
            )
        self.streaming = hasattr(data, "training_iterator")
        if not (self.streaming or callable(data)):
            raise TypeError(
                "`data` must be a streaming data object (with `training_iterator(seed)`, e.g. "
                "keras_glam.data.StreamingData) or a callable `(seed, skip_batches) -> "
                f"dataset`. Received: {type(data).__name__}"
            )
        self.model = model
        self.data = data
        self.total_steps = total_steps
        self.checkpoint_interval = checkpoint_interval
        self.seed = seed
        self.validation_data = validation_data
        self.resume = resume
        self.max_consecutive_skipped_steps = max_consecutive_skipped_steps
        self.loss_spike_factor = loss_spike_factor
        self.max_rollbacks = max_rollbacks
        self.callbacks = list(callbacks)
        self.verbose = verbose
        self.manager = CheckpointManager(
            checkpoint_dir, max_to_keep=max_checkpoints, validate_state=TrainingState.from_dict
        )
        self.tokens_per_step = None
        self.iterator = None  # The `DataIterator` of the current stream (streaming data).

    def fit(self):
        """Train to `total_steps`, resuming and rolling back as needed.

        Returns:
            The final `TrainingState` (with the per-chunk logs and per-step losses of the run).
        """
        if not self.resume and self.manager.checkpoints():
            raise FileExistsError(
                f"{self.manager.directory} already holds checkpoints of an earlier run; they "
                "are kept. Resume from them (`resume=True`) or choose another directory."
            )
        self._prepare_checkpoint_observers()
        try:
            state = self._initial_state()
            while state.step < self.total_steps:
                failure = self._run_segment(state)
                if failure is not None:
                    state = self._roll_back(state, failure)
        finally:
            self._finish_checkpoint_observers()
        return state

    def _prepare_checkpoint_observers(self):
        """Before the newest checkpoint is looked up, observers that define
        `prepare_checkpoints(model, manager, resume=...)` may add checkpoints to the directory
        (`keras_glam.callbacks.HubCheckpoint` downloads the newest one of its Hub repository)
        or refuse to start."""
        for callback in self.callbacks:
            prepare = getattr(callback, "prepare_checkpoints", None)
            if isinstance(callback, CheckpointObserver) and callable(prepare):
                prepare(self.model, self.manager, resume=self.resume)

    def _finish_checkpoint_observers(self):
        """When the run ends (returning or raising; Keras' `on_train_end` also comes between
        rollbacks), observers that define `on_training_finished()` may wrap up: a
        `HubCheckpoint` waits, bounded, for its pushes."""
        for callback in self.callbacks:
            finish = getattr(callback, "on_training_finished", None)
            if isinstance(callback, CheckpointObserver) and callable(finish):
                finish()

    def _initial_state(self):
        """The state to start from (a new one, or the newest valid checkpoint's, restored into
        the model), with its data stream entered; the first batch is checked against the model
        before anything is written (a new run then writes its step-0 checkpoint)."""
        checkpoint = self.manager.latest() if self.resume else None
        if checkpoint is None:
            state = TrainingState(seed=self.seed)
        else:
            state = TrainingState.from_dict(self.manager.restore(checkpoint, self.model))
            if state.seed != self.seed:
                raise ValueError(
                    f"The checkpoint {checkpoint.path} was written by a run with seed "
                    f"{state.seed}, this Trainer has seed={self.seed}: resuming would change the "
                    "data order. Use the same seed, or another checkpoint directory for a new run."
                )
        if self.streaming:
            self._start_stream(state, checkpoint)
            first_batches = self.iterator.batches(state.data_position)  # `fit` starts there again.
        else:
            first_batches = self.data(seed=data_seed(self.seed, 0), skip_batches=0)
        self.tokens_per_step = check_training_batches(first_batches, self.model)
        if self.validation_data is not None:
            check_training_batches(self.validation_data, self.model, "validation data")
        if checkpoint is None:
            self.save_checkpoint(state)
        else:
            logger.warning(
                "Resuming from %s (step %d, data stream %d, position %d).",
                checkpoint.path,
                state.step,
                state.data_stream,
                state.data_position,
            )
        return state

    def _start_stream(self, state, checkpoint=None):
        """A `DataIterator` for `state`'s data stream: new (at position 0), or restored from
        `checkpoint` at `state.data_position` without reading what came before."""
        self.iterator = self.data.training_iterator(data_seed(self.seed, state.data_stream))
        if checkpoint is None:
            return
        if not self.iterator.has_state(checkpoint.path):
            raise ValueError(
                f"The checkpoint {checkpoint.path} predates streamed resume: it holds no data "
                "stream state. Start a new run in another --output (checkpoint directory)."
            )
        position = self.iterator.restore(checkpoint.path)
        if position != state.data_position:
            raise ValueError(
                f"The checkpoint {checkpoint.path} records data position {state.data_position} "
                f"but its data iterator was saved at {position}: the checkpoint is inconsistent. "
                "Resume from an earlier checkpoint (move this one aside)."
            )

    def _dataset(self, state):
        """The training dataset from `state.data_position` of `state.data_stream`."""
        if self.streaming:
            return self.iterator.dataset(state.data_position)
        return self.data(
            seed=data_seed(self.seed, state.data_stream), skip_batches=state.data_position
        )

    def _run_segment(self, state):
        """One `fit` call from `state.step` over as many whole chunks as remain (or the final
        partial chunk). Updates `state` after every healthy chunk; returns a `ChunkFailure` or
        None.

        Raises:
            DataError: the data stream stopped at bad input (`tf.data` hands `fit` its own
                error; the iterator kept the one naming the file and line).
        """
        remaining = self.total_steps - state.step
        steps_per_epoch = min(self.checkpoint_interval, remaining)
        first_epoch = state.step // self.checkpoint_interval
        epochs = max(remaining // self.checkpoint_interval, 1)
        dataset = self._dataset(state)
        progress = TrainingProgress(tokens_per_step=self.tokens_per_step, initial_step=state.step)
        expert_load = ExpertLoadRecorder(initial_step=state.step)
        monitor = _ChunkMonitor(self, state, progress, expert_load)
        with _preprocessor_bypassed(self.model), self._data_errors_named():
            self.model.fit(
                dataset,
                steps_per_epoch=steps_per_epoch,
                shuffle=False,  # The data stream is shuffled, and must stay reproducible.
                initial_epoch=first_epoch,
                epochs=first_epoch + epochs,
                validation_data=self.validation_data,
                callbacks=[progress, expert_load, monitor, *self.callbacks],
                verbose=self.verbose,
            )
        if monitor.failure is None:
            return None
        return ChunkFailure(monitor.failure, state.data_position + monitor.batches_in_chunk)

    @contextlib.contextmanager
    def _data_errors_named(self):
        """A `fit` stopped by bad data raises the data iterator's one-line `DataError`."""
        try:
            yield
        except Exception:
            if self.streaming and self.iterator.error is not None:
                raise self.iterator.error from None
            raise

    def evaluate(self, dataset):
        """`model.evaluate` on batches of token ids (as `fit` gets them); returns the logs dict."""
        with _preprocessor_bypassed(self.model):
            return self.model.evaluate(dataset, return_dict=True, verbose=0)

    def save_checkpoint(self, state):
        """Atomically checkpoint the model, its optimizer and `state` (with streaming data,
        also the data iterator's state at `state.data_position`); tell the observers.

        Returns:
            The new `keras_glam.training.checkpointing.Checkpoint`.
        """

        def save_data_stream(directory):
            return self.iterator.save(directory, position=state.data_position)

        checkpoint = self.manager.save(
            self.model, state.to_dict(), extra_files=save_data_stream if self.streaming else None
        )
        logger.info("Saved checkpoint %s (step %d).", checkpoint.path, checkpoint.step)
        for callback in self.callbacks:
            if isinstance(callback, CheckpointObserver):
                callback.on_checkpoint_saved(checkpoint)
        return checkpoint

    def _roll_back(self, state, failure):
        rollbacks = state.rollbacks + 1
        consecutive_failures = state.consecutive_failures + 1
        if rollbacks > self.max_rollbacks:
            raise TrainingDivergedError(
                f"Training failed its health checks again at step {state.step} ({failure}) "
                f"after {self.max_rollbacks} rollbacks. Lower the learning rate, check the data "
                "for corrupt documents, or raise `max_rollbacks` / `loss_spike_factor`."
            )
        candidates = self.manager.valid_checkpoints()
        if consecutive_failures > 1 and state.rollback_step is not None:
            candidates = [c for c in candidates if c.step < state.rollback_step]
        if not candidates:
            raise TrainingDivergedError(
                f"Training failed at step {state.step} ({failure}) and no earlier healthy "
                "checkpoint is left to roll back to. Lower the learning rate or check the data; "
                "keep more checkpoints with `max_checkpoints`."
            )
        target = candidates[0]
        restored = TrainingState.from_dict(self.manager.restore(target, self.model))
        skipped = failure.data_position - restored.data_position
        note = (
            f"step {state.step}: {failure}; rolled back to step {target.step} "
            f"({target.path}), continuing the data stream at batch {failure.data_position} "
            f"({skipped} batches skipped)"
        )
        logger.warning("Rollback %d: %s.", rollbacks, note)
        # The same stream, from where the failure left it (the streaming iterator is there;
        # `make_dataset` skips to it).
        restored.data_stream = state.data_stream
        restored.data_position = failure.data_position
        restored.rollbacks = rollbacks
        restored.consecutive_failures = consecutive_failures
        restored.rollback_step = target.step
        restored.events = state.events + [note]
        self.save_checkpoint(restored)
        return restored


@contextlib.contextmanager
def _preprocessor_bypassed(model):
    """The batches are token ids already: detach a KerasHub task's preprocessor meanwhile
    (KerasHub's documented way to feed preprocessed data is `task.preprocessor = None`)."""
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is None:
        yield
        return
    model.preprocessor = None
    try:
        yield
    finally:
        model.preprocessor = preprocessor


class _ChunkMonitor(keras.callbacks.Callback):
    """Checks every chunk's health, then advances the state and checkpoints, or stops `fit`."""

    def __init__(self, trainer, state, progress, expert_load):
        super().__init__()
        self.trainer = trainer
        self.state = state
        self.progress = progress
        self.expert_load = expert_load
        self.failure = None
        self.batches_in_chunk = 0  # Batches trained on in the current chunk.
        self._skipped_at_epoch_start = 0
        self._skipped_so_far = 0
        self._consecutive_skips = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._skipped_at_epoch_start = skipped_steps(self.model) or 0
        self._skipped_so_far = self._skipped_at_epoch_start
        self._consecutive_skips = 0
        self.batches_in_chunk = 0
        self.progress.step_history.clear()
        self.expert_load.history.clear()

    def on_train_batch_end(self, batch, logs=None):
        self.batches_in_chunk += 1
        skipped = skipped_steps(self.model) or 0
        skipped_now = skipped > self._skipped_so_far
        self._consecutive_skips = self._consecutive_skips + 1 if skipped_now else 0
        self._skipped_so_far = skipped
        if self._consecutive_skips >= self.trainer.max_consecutive_skipped_steps:
            self.failure = f"{self._consecutive_skips} consecutive steps with non-finite gradients"
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        steps = self.params["steps"]
        cross_entropy = logs.get("cross_entropy", logs.get("loss"))
        baseline = self.state.last_healthy_cross_entropy
        if self.failure is None:
            if self._skipped_so_far - self._skipped_at_epoch_start >= steps:
                self.failure = "every step of the chunk had non-finite gradients"
            elif cross_entropy is None or not math.isfinite(cross_entropy):
                self.failure = f"non-finite training loss ({cross_entropy})"
            elif baseline is not None and cross_entropy > self.trainer.loss_spike_factor * baseline:
                self.failure = (
                    f"loss spike: chunk cross-entropy {cross_entropy:.4f} > "
                    f"{self.trainer.loss_spike_factor} x {baseline:.4f} (last healthy chunk)"
                )
        if self.failure is not None:
            self.model.stop_training = True
            return
        state = self.state
        state.step += steps
        state.data_position += steps
        state.consecutive_failures = 0
        state.last_healthy_cross_entropy = float(cross_entropy)
        state.chunk_logs.append({"step": state.step, **{k: float(v) for k, v in logs.items()}})
        state.step_losses.extend([step, loss] for step, loss in self.progress.step_history)
        state.expert_load.extend(
            [step, fractions.tolist()] for step, fractions in self.expert_load.history
        )
        self.trainer.save_checkpoint(state)


def check_training_batches(dataset, model, description="training data"):
    """Check a dataset's first batch against the model, before anything is compiled.

    Args:
        dataset: a `tf.data.Dataset` (or iterable) of `(x, y, sample_weight)` or `(x, y)`
            batches with `x = {"token_ids": [B, L], "padding_mask": [B, L]}`.
        model: the language model (its `backbone` gives the vocabulary and routing groups).
        description: what the dataset is, for error messages.

    Returns:
        int, the tokens in one batch (`B * L`).

    Raises:
        ValueError: naming what does not fit and how to fix it.
    """
    batch = next(iter(dataset), None)
    if batch is None:
        raise ValueError(f"The {description} is empty: it yields no batch.")
    if not (isinstance(batch, (tuple, list)) and len(batch) in (2, 3)):
        raise ValueError(
            f"Each {description} batch must be `(x, y)` or `(x, y, sample_weight)`, as "
            "`keras_glam.data.packed_lm_dataset` yields; got "
            f"{type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}."
        )
    x, y = batch[0], batch[1]
    if not (isinstance(x, dict) and {"token_ids", "padding_mask"} <= set(x)):
        raise ValueError(
            f"The inputs of a {description} batch must be a dict with 'token_ids' and "
            f"'padding_mask'; got {type(x).__name__}"
            + (f" with keys {sorted(x)}" if isinstance(x, dict) else "")
            + "."
        )
    arrays = {"token_ids": x["token_ids"], "padding_mask": x["padding_mask"], "y": y}
    if len(batch) == 3 and batch[2] is not None:
        arrays["sample_weight"] = batch[2]
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    shape = arrays["token_ids"].shape
    if len(shape) != 2:
        raise ValueError(
            f"token_ids of a {description} batch must have shape [batch, length]; got "
            f"{shape}. Batch the rows (`dataset.batch(batch_size)`), once."
        )
    for name, value in arrays.items():
        if value.shape != shape:
            raise ValueError(
                f"'{name}' of a {description} batch has shape {value.shape}, but token_ids "
                f"has {shape}: every tensor of a batch must be [batch, length]."
            )
    vocabulary_size = model.backbone.vocabulary_size
    for name in ("token_ids", "y"):
        values = arrays[name]
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"'{name}' of a {description} batch must be integer token ids.")
        if values.size and (values.min() < 0 or values.max() >= vocabulary_size):
            raise ValueError(
                f"'{name}' of a {description} batch holds ids from {values.min()} to "
                f"{values.max()}, outside the model's vocabulary [0, {vocabulary_size}). The data "
                "was tokenized with another vocabulary: use the model's own tokenizer."
            )
    groups = getattr(model.backbone, "num_routing_groups", None)
    if groups and (shape[0] * shape[1]) % groups:
        raise ValueError(
            f"A {description} batch has {shape[0]} x {shape[1]} tokens, which cannot be split "
            f"into the model's num_routing_groups={groups} equal routing groups. Change the "
            "batch size or sequence length."
        )
    return int(shape[0] * shape[1])
