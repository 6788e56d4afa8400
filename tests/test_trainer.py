"""The fault-tolerant training driver: chunks, checkpoints, exact resume, rollback, bad input."""

import json
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_glam.models.glam_backbone import GLaMBackbone
from keras_glam.models.glam_causal_lm import GLaMCausalLM
from keras_glam.training.callbacks import CheckpointObserver
from keras_glam.training.checkpointing import CheckpointManager
from keras_glam.training.trainer import Trainer
from keras_glam.training.trainer import TrainingDivergedError
from keras_glam.training.trainer import data_seed

VOCABULARY = 32
BATCH, LENGTH = 2, 8


def _lm(num_experts=None, optimizer="auto", seed=0):
    keras.utils.set_random_seed(seed)
    backbone = GLaMBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=2 if num_experts else 1,
        hidden_dim=16,
        intermediate_dim=32,
        num_heads=2,
        head_dim=8,
        num_experts=num_experts,
    )
    lm = GLaMCausalLM(backbone)
    lm.compile(optimizer=optimizer)
    return lm


def _batch(seed, position, poison=None):
    """Batch `position` of stream `seed`: random tokens whose labels are all 1 (learnt within a
    few steps), or as poisoned."""
    rng = np.random.default_rng([seed, position])
    token_ids = rng.integers(0, VOCABULARY, size=(BATCH, LENGTH)).astype("int32")
    labels = np.ones((BATCH, LENGTH), "int32")
    weights = np.ones((BATCH, LENGTH), "float32")
    if poison == "nan":
        weights[0, 0] = np.nan
    elif poison == "random_labels":
        labels = rng.integers(0, VOCABULARY, size=(BATCH, LENGTH)).astype("int32")
    x = {"token_ids": token_ids, "padding_mask": np.ones((BATCH, LENGTH), "int32")}
    return x, labels, weights


def _make_dataset(poison=lambda seed, position: None):
    """`make_dataset(seed, skip_batches)` for the Trainer: an endless deterministic stream."""

    def make_dataset(seed, skip_batches):
        def batches():
            position = skip_batches
            while True:
                yield _batch(seed, position, poison(seed, position))
                position += 1

        signature = (
            {
                "token_ids": tf.TensorSpec((BATCH, LENGTH), tf.int32),
                "padding_mask": tf.TensorSpec((BATCH, LENGTH), tf.int32),
            },
            tf.TensorSpec((BATCH, LENGTH), tf.int32),
            tf.TensorSpec((BATCH, LENGTH), tf.float32),
        )
        return tf.data.Dataset.from_generator(batches, output_signature=signature)

    return make_dataset


def _validation_data():
    batches = [_batch(12345, position) for position in range(2)]
    return tf.data.Dataset.from_tensor_slices(
        tuple(
            {k: np.stack([b[0][k] for b in batches]) for k in batches[0][0]}
            if i == 0
            else np.stack([b[i] for b in batches])
            for i in range(3)
        )
    )


def _weights(lm):
    return [np.array(v.numpy()) for v in lm.weights]


class _RecordCheckpoints(CheckpointObserver):
    def __init__(self):
        super().__init__()
        self.steps = []

    def on_checkpoint_saved(self, checkpoint):
        self.steps.append(checkpoint.step)


def test_trains_in_checkpointed_chunks_with_visible_metrics(tmp_path):
    lm = _lm(num_experts=4)
    observer = _RecordCheckpoints()
    callbacks = [observer]
    tensorboard = None
    if _has_tensorboard():
        tensorboard = keras.callbacks.TensorBoard(str(tmp_path / "tensorboard"))
        callbacks.append(tensorboard)
    trainer = Trainer(
        lm,
        _make_dataset(),
        total_steps=6,
        checkpoint_dir=tmp_path / "checkpoints",
        checkpoint_interval=3,
        validation_data=_validation_data(),
        callbacks=callbacks,
        verbose=0,
    )
    state = trainer.fit()

    assert state.step == 6 and state.data_position == 6 and state.rollbacks == 0
    assert observer.steps == [0, 3, 6]
    assert [c.step for c in trainer.manager.checkpoints()] == [6, 3, 0]
    assert [chunk["step"] for chunk in state.chunk_logs] == [3, 6]
    for name in (
        "loss",
        "cross_entropy",
        "z_loss",
        "aux_loss",
        "dropped_top1",
        "dropped_top2",
        "expert_load_cv",
        "skipped_steps",
        "tokens_per_second",
        "val_cross_entropy",
    ):
        assert name in state.chunk_logs[-1], name
    assert state.chunk_logs[-1]["skipped_steps"] == 0
    assert [step for step, _ in state.step_losses] == [1, 2, 3, 4, 5, 6]
    # The per-step losses average to each chunk's logged running mean.
    np.testing.assert_allclose(
        np.mean([loss for _, loss in state.step_losses[3:]]), state.chunk_logs[1]["loss"], rtol=1e-4
    )
    step, fractions = state.expert_load[-1]
    assert step == 6 and np.asarray(fractions).shape == (len(lm.backbone.moe_layers), 4)
    np.testing.assert_allclose(np.asarray(fractions).sum(axis=1), 1.0, rtol=1e-6)
    if tensorboard is not None:
        tags = _tensorboard_tags(tmp_path / "tensorboard" / "train")
        for tag in ("epoch_cross_entropy", "epoch_skipped_steps", "epoch_tokens_per_second"):
            assert tag in tags


def _has_tensorboard():
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _tensorboard_tags(directory):
    tags = set()
    for name in os.listdir(directory):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name)):
            tags.update(value.tag for value in event.summary.value)
    return tags


def test_resuming_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, caplog):
    uninterrupted = _lm()
    Trainer(
        uninterrupted, _make_dataset(), 6, tmp_path / "a", checkpoint_interval=2, verbose=0
    ).fit()

    first_half = _lm()
    Trainer(first_half, _make_dataset(), 4, tmp_path / "b", checkpoint_interval=2, verbose=0).fit()
    # The newest checkpoint (step 4) is damaged: resuming falls back to step 2 and redoes 2 steps.
    newest = CheckpointManager(tmp_path / "b").checkpoints()[0]
    with open(os.path.join(newest.path, "model.weights.h5"), "r+b") as file:
        file.truncate(64)
    resumed = _lm(seed=99)  # Other initial weights: everything must come from the checkpoint.
    with caplog.at_level(logging.WARNING):
        state = Trainer(
            resumed, _make_dataset(), 6, tmp_path / "b", checkpoint_interval=2, verbose=0
        ).fit()
    assert "Skipping checkpoint" in caplog.text
    assert state.step == 6
    for expected, actual in zip(_weights(uninterrupted), _weights(resumed)):
        np.testing.assert_array_equal(expected, actual)


@pytest.mark.slow
def test_a_malformed_state_is_skipped_for_the_previous_checkpoint(tmp_path, caplog):
    """A record that passes the manager's checks but holds a state the Trainer cannot resume
    from (its data position a string) is corrupt: resuming falls back to the checkpoint before."""
    Trainer(_lm(), _make_dataset(), 4, tmp_path, checkpoint_interval=2, verbose=0).fit()
    newest = CheckpointManager(tmp_path).checkpoints()[0]
    assert newest.step == 4
    with open(os.path.join(newest.path, "state.json")) as file:
        record = json.load(file)
    record["state"]["data_position"] = "4"
    with open(os.path.join(newest.path, "state.json"), "w") as file:
        json.dump(record, file)
    with caplog.at_level(logging.WARNING):
        state = Trainer(_lm(), _make_dataset(), 6, tmp_path, checkpoint_interval=2, verbose=0).fit()
    assert f"Skipping checkpoint {newest.path}" in caplog.text
    assert "'data_position' is '4'" in caplog.text
    assert "Resuming from" in caplog.text and "(step 2," in caplog.text
    assert state.step == 6 and [log["step"] for log in state.chunk_logs] == [2, 4, 6]


def test_rolls_back_after_repeated_non_finite_steps(tmp_path):
    poisoned_stream = data_seed(0, 0)
    make_dataset = _make_dataset(
        lambda seed, position: "nan" if seed == poisoned_stream and position >= 4 else None
    )
    lm = _lm()
    state = Trainer(
        lm,
        make_dataset,
        total_steps=8,
        checkpoint_dir=tmp_path,
        checkpoint_interval=2,
        max_consecutive_skipped_steps=2,
        verbose=0,
    ).fit()
    assert state.step == 8 and state.rollbacks == 1 and state.data_stream == 1
    assert "2 consecutive steps with non-finite gradients" in state.events[0]
    assert "rolled back to step 4" in state.events[0]
    assert int(lm.optimizer.skipped_steps.numpy()) == 0
    assert all(np.all(np.isfinite(w)) for w in _weights(lm))


def test_rolls_back_after_a_loss_spike(tmp_path):
    spiking_stream = data_seed(0, 0)
    make_dataset = _make_dataset(
        lambda seed, position: "random_labels"
        if seed == spiking_stream and position >= 8
        else None
    )
    lm = _lm(optimizer=keras.optimizers.Adam(0.05))
    state = Trainer(
        lm,
        make_dataset,
        total_steps=12,
        checkpoint_dir=tmp_path,
        checkpoint_interval=4,
        loss_spike_factor=1.5,
        verbose=0,
    ).fit()
    assert state.rollbacks == 1 and "loss spike" in state.events[0]
    assert "rolled back to step 8" in state.events[0]
    assert state.step == 12
    assert state.chunk_logs[-1]["cross_entropy"] < state.chunk_logs[0]["cross_entropy"]


def test_gives_up_when_every_data_order_fails(tmp_path):
    make_dataset = _make_dataset(lambda seed, position: "nan" if position >= 2 else None)
    trainer = Trainer(
        _lm(),
        make_dataset,
        total_steps=8,
        checkpoint_dir=tmp_path,
        checkpoint_interval=2,
        max_consecutive_skipped_steps=2,
        max_rollbacks=1,
        verbose=0,
    )
    with pytest.raises(TrainingDivergedError, match="after 1 rollbacks"):
        trainer.fit()


def _wrong_batches(kind):
    x, y, weights = _batch(0, 0)
    if kind == "rank_3":
        x = {k: v[..., None] for k, v in x.items()}
    elif kind == "labels_shape":
        y = y[:, :-1]
    elif kind == "no_padding_mask":
        x = {"token_ids": x["token_ids"]}
    elif kind == "out_of_vocabulary":
        x = dict(x, token_ids=x["token_ids"] + VOCABULARY)
    elif kind == "not_a_tuple":
        return tf.data.Dataset.from_tensors(x).repeat()
    return tf.data.Dataset.from_tensors((x, y, weights)).repeat()


@pytest.mark.parametrize(
    "kind, message",
    [
        ("rank_3", "shape \\[batch, length\\]"),
        ("labels_shape", "'y' of a training data batch has shape"),
        ("no_padding_mask", "'token_ids' and 'padding_mask'"),
        ("out_of_vocabulary", "outside the model's vocabulary"),
        ("not_a_tuple", "must be `\\(x, y\\)`"),
    ],
)
def test_bad_batches_fail_before_anything_is_compiled_or_written(tmp_path, kind, message):
    lm = _lm()
    trainer = Trainer(
        lm, lambda seed, skip_batches: _wrong_batches(kind), 4, tmp_path, verbose=0
    )
    with pytest.raises(ValueError, match=message):
        trainer.fit()
    assert lm.train_function is None
    assert os.listdir(tmp_path) == []


def test_an_earlier_run_is_never_overwritten(tmp_path):
    Trainer(_lm(), _make_dataset(), 2, tmp_path, checkpoint_interval=2, verbose=0).fit()
    before = {name: os.path.getmtime(tmp_path / name) for name in os.listdir(tmp_path)}
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        Trainer(_lm(), _make_dataset(), 2, tmp_path, resume=False, verbose=0).fit()
    assert {name: os.path.getmtime(tmp_path / name) for name in os.listdir(tmp_path)} == before
