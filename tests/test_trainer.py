"""The fault-tolerant training driver: chunks, checkpoints, exact resume, rollback, bad input."""

import json
import logging
import os
import shutil

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
    make_dataset = _make_dataset(lambda seed, position: "nan" if position in (4, 5) else None)
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
    # PaLM's remedy: the same stream, the two bad batches skipped, not read again.
    assert state.step == 8 and state.rollbacks == 1 and state.data_stream == 0
    assert state.data_position == 10
    assert "2 consecutive steps with non-finite gradients" in state.events[0]
    assert "rolled back to step 4" in state.events[0]
    assert "continuing the data stream at batch 6 (2 batches skipped)" in state.events[0]
    assert int(lm.optimizer.skipped_steps.numpy()) == 0
    assert all(np.all(np.isfinite(w)) for w in _weights(lm))


def test_rolls_back_after_a_loss_spike(tmp_path):
    make_dataset = _make_dataset(
        lambda seed, position: "random_labels" if 8 <= position < 12 else None
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
    assert state.step == 12 and state.data_position == 16
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


# ------------------------------------------------------------------------------------------------
# Streaming data: the data iterator's state travels in every checkpoint.


def _streaming_lm(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = GLaMBackbone(
        vocabulary_size=4096,  # glam_tiny_8e's tokenizer.
        num_layers=1,
        hidden_dim=8,
        intermediate_dim=16,
        num_heads=2,
        head_dim=4,
    )
    lm = GLaMCausalLM(backbone)
    lm.compile()
    return lm


def _write_shards(directory, shards=2, lines=3000):
    directory.mkdir()
    for shard in range(shards):
        with open(directory / f"part-{shard}.jsonl", "w") as file:
            for i in range(lines):
                file.write(json.dumps({"text": f"Shard {shard} line {i} says {'ok ' * (i % 5)}."}))
                file.write("\n")
    return str(directory / "*.jsonl")


def _streaming_data(pattern, **overrides):
    from keras_glam.data.streaming import StreamingData
    from keras_glam.models.glam_tokenizer import GLaMTokenizer

    settings = dict(sequence_length=64, batch_size=8, held_out_fraction=0.1, shuffle_buffer=16)
    settings.update(overrides)
    return StreamingData.from_specs([pattern], GLaMTokenizer.from_preset("glam_tiny_8e"), **settings)


def _parsed_during(counts, function):
    before = sum(counts)
    result = function()
    return result, sum(counts) - before


def _streamed_fit(lm, pattern, total_steps, directory):
    """`fit` of a Trainer on JSON lines shards, about 150 documents per batch."""
    data = _streaming_data(pattern, sequence_length=128, batch_size=16)
    return Trainer(lm, data, total_steps, directory, checkpoint_interval=12, verbose=0).fit


@pytest.mark.slow
def test_streamed_resume_is_exact_and_reads_nothing_again(tmp_path, parsed_lines):
    pattern = _write_shards(tmp_path / "shards")
    uninterrupted = _streaming_lm()
    _streamed_fit(uninterrupted, pattern, 26, tmp_path / "a")()

    first_half = _streaming_lm()
    _, parsed_before_checkpoint = _parsed_during(
        parsed_lines, _streamed_fit(first_half, pattern, 24, tmp_path / "b")
    )
    newest = CheckpointManager(tmp_path / "b").latest()
    assert newest.step == 24 and "data_iterator.index" in os.listdir(newest.path)

    resumed = _streaming_lm(seed=99)  # Other weights: everything must come from the checkpoint.
    state, parsed_on_resume = _parsed_during(
        parsed_lines, _streamed_fit(resumed, pattern, 26, tmp_path / "b")
    )
    assert state.step == 26 and state.data_position == 26
    for expected, actual in zip(_weights(uninterrupted), _weights(resumed)):
        np.testing.assert_array_equal(expected, actual)
    # The 24 batches before the checkpoint hold about 3,500 documents. Re-entering the stream
    # by skipping batches (the `make_dataset` way) parses them all again, and more; the
    # restored iterator parses only what the last 2 batches and the pipeline's read-ahead
    # need (and the first block of each file, which building the pipeline checks).
    assert parsed_before_checkpoint > 3000
    assert parsed_on_resume < parsed_before_checkpoint / 2


def test_a_checkpoint_of_another_input_is_refused(tmp_path):
    pattern = _write_shards(tmp_path / "shards", lines=400)
    Trainer(
        _streaming_lm(), _streaming_data(pattern), 1, tmp_path / "run", checkpoint_interval=1,
        verbose=0,
    ).fit()
    lm = _streaming_lm()  # Before the tokenizer: seeding drops TensorFlow's tokenizer resources.
    other = _streaming_data(pattern, shuffle_buffer=8)
    with pytest.raises(ValueError, match="saved for another input .* same settings"):
        Trainer(lm, other, 2, tmp_path / "run", verbose=0).fit()


@pytest.mark.slow
def _fail_chunk_once(monkeypatch, at_step):
    """The chunk ending at `at_step` fails its health check the first time, after training."""
    from keras_glam.training import trainer

    monitor_class = getattr(trainer, "_ChunkMonitor")
    real_end = monitor_class.on_epoch_end
    failed = []

    def on_epoch_end(monitor, epoch, logs=None):
        if monitor.state.step + monitor.params["steps"] == at_step and not failed:
            failed.append(at_step)
            monitor.failure = "loss spike (injected)"
        real_end(monitor, epoch, logs)

    monkeypatch.setattr(monitor_class, "on_epoch_end", on_epoch_end)


def test_tampered_data_state_falls_back_and_a_rollback_skips_ahead(
    tmp_path, caplog, monkeypatch
):
    pattern = _write_shards(tmp_path / "shards", lines=600)
    Trainer(
        _streaming_lm(), _streaming_data(pattern), 4, tmp_path / "run", checkpoint_interval=2,
        verbose=0,
    ).fit()
    newest = CheckpointManager(tmp_path / "run").checkpoints()[0]
    with open(os.path.join(newest.path, "data_iterator.json"), "r+b") as file:
        file.write(b" ")  # Same size, other bytes.

    _fail_chunk_once(monkeypatch, at_step=4)
    with caplog.at_level(logging.WARNING):
        state = Trainer(
            _streaming_lm(), _streaming_data(pattern), 6, tmp_path / "run",
            checkpoint_interval=2, verbose=0,
        ).fit()
    assert f"Skipping checkpoint {newest.path}: data_iterator.json does not match" in caplog.text
    assert "Resuming from" in caplog.text and "(step 2," in caplog.text
    # The chunk of steps 2-4 failed: back to step 2's weights, on the same stream from batch 4.
    assert state.step == 6 and state.data_stream == 0 and state.data_position == 8
    rollback = next(c for c in CheckpointManager(tmp_path / "run").checkpoints() if c.step == 2)
    with open(os.path.join(rollback.path, "data_iterator.json")) as file:
        saved = json.load(file)
    assert saved["position"] == 4
    assert json.loads(saved["fingerprint"])["seed"] == data_seed(0, 0)


@pytest.mark.slow
def test_resuming_from_a_rollback_checkpoint_matches_the_run_that_rolled_back(
    tmp_path, monkeypatch
):
    pattern = _write_shards(tmp_path / "shards", lines=600)
    _fail_chunk_once(monkeypatch, at_step=4)
    rolled_back = _streaming_lm()
    state = Trainer(
        rolled_back, _streaming_data(pattern), 6, tmp_path / "run", checkpoint_interval=2,
        max_checkpoints=10, verbose=0,
    ).fit()
    assert state.rollbacks == 1 and state.data_position == 8
    # Keep only what was written up to the rollback's own checkpoint (step 2, position 4).
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    for checkpoint in CheckpointManager(tmp_path / "copy").checkpoints()[:2]:  # Steps 6, 4.
        shutil.rmtree(checkpoint.path)
    newest = CheckpointManager(tmp_path / "copy").latest()
    with open(os.path.join(newest.path, "data_iterator.json")) as file:
        assert newest.step == 2 and json.load(file)["position"] == 4
    resumed = _streaming_lm(seed=99)
    state = Trainer(
        resumed, _streaming_data(pattern), 6, tmp_path / "copy", checkpoint_interval=2,
        verbose=0,
    ).fit()
    assert state.step == 6 and state.data_position == 8
    for expected, actual in zip(_weights(rolled_back), _weights(resumed)):
        np.testing.assert_array_equal(expected, actual)


def test_a_checkpoint_without_data_state_says_it_predates_streamed_resume(tmp_path):
    pattern = _write_shards(tmp_path / "shards", lines=400)
    lm = _streaming_lm()  # Before the tokenizer: seeding drops TensorFlow's tokenizer resources.
    data = _streaming_data(pattern)
    make_dataset = lambda seed, skip_batches: data.training_dataset(seed).skip(skip_batches)
    Trainer(lm, make_dataset, 1, tmp_path / "run", verbose=0).fit()
    lm = _streaming_lm()
    with pytest.raises(ValueError, match="predates streamed resume.* in another --output"):
        Trainer(lm, _streaming_data(pattern), 2, tmp_path / "run", verbose=0).fit()
