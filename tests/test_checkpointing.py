"""Atomic training-state checkpoints: exact round trip, pruning, corruption detection."""

import json
import logging
import os

import keras
import numpy as np
import pytest

from keras_glam.training import checkpointing
from keras_glam.training.checkpointing import CheckpointManager
from keras_glam.training.checkpointing import CorruptCheckpointError
from keras_glam.training.skip_nonfinite import SkipNonFiniteSteps


def _trained_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    model.compile(optimizer=SkipNonFiniteSteps(keras.optimizers.Adam(0.01)), loss="mse")
    x = np.random.default_rng(seed).normal(size=(8, 3)).astype("float32")
    model.fit(x, x[:, :1], verbose=0, epochs=2)
    return model


def _all_values(model):
    return [np.array(v.numpy()) for v in model.weights + model.optimizer.variables]


def test_round_trip_is_exact(tmp_path):
    model = _trained_model()
    manager = CheckpointManager(tmp_path)
    checkpoint = manager.save(model, {"step": 7, "data_position": 7, "note": "x"})
    saved = _all_values(model)

    other = _trained_model(seed=1)  # Different weights and optimizer state, same structure.
    state = manager.restore(checkpoint, other)
    assert state == {"step": 7, "data_position": 7, "note": "x"}
    for expected, actual in zip(saved, _all_values(other)):
        np.testing.assert_array_equal(expected, actual)
    assert checkpoint.step == 7 and checkpoint.sequence == 0


def test_layout_manifest_and_no_temporary_files(tmp_path):
    model = _trained_model()
    checkpoint = CheckpointManager(tmp_path).save(model, {"step": 3})
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000-step-000000003"]
    assert sorted(os.listdir(checkpoint.path)) == [
        "model.weights.h5",
        "optimizer.npz",
        "state.json",
    ]
    with open(os.path.join(checkpoint.path, "state.json")) as file:
        record = json.load(file)
    assert set(record["files"]) == {"model.weights.h5", "optimizer.npz"}
    assert record["sequence"] == 0 and record["state"] == {"step": 3}


def test_keeps_the_newest_by_write_order(tmp_path):
    model = _trained_model()
    manager = CheckpointManager(tmp_path, max_to_keep=2)
    for step in (10, 20, 30, 20):  # The last one is a rollback to step 20.
        manager.save(model, {"step": step})
    kept = manager.checkpoints()
    assert [(c.sequence, c.step) for c in kept] == [(3, 20), (2, 30)]
    assert manager.latest().sequence == 3
    assert len(os.listdir(tmp_path)) == 2


def _truncate_weights(path):
    with open(os.path.join(path, "model.weights.h5"), "r+b") as file:
        file.truncate(100)


def _flip_last_byte_of_optimizer_state(path):
    with open(os.path.join(path, "optimizer.npz"), "r+b") as file:
        file.seek(-1, os.SEEK_END)
        last = file.read(1)
        file.seek(-1, os.SEEK_END)
        file.write(bytes([last[0] ^ 0xFF]))


def _remove_state(path):
    os.remove(os.path.join(path, "state.json"))


def _break_state_json(path):
    with open(os.path.join(path, "state.json"), "w") as file:
        file.write("{")


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncate_weights, "bytes"),
        (_flip_last_byte_of_optimizer_state, "SHA-256"),
        (_remove_state, "state.json is missing"),
        (_break_state_json, "unreadable"),
    ],
    ids=["truncated", "flipped_byte", "no_state", "bad_json"],
)
def test_corrupt_newest_checkpoint_is_skipped_with_a_message(tmp_path, caplog, damage, message):
    model = _trained_model()
    manager = CheckpointManager(tmp_path)
    older = manager.save(model, {"step": 1})
    newer = manager.save(model, {"step": 2})
    damage(newer.path)
    with pytest.raises(CorruptCheckpointError, match=message):
        manager.verify(newer)
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        assert manager.latest() == older
    assert "Skipping checkpoint" in caplog.text and os.path.basename(newer.path) in caplog.text


def test_a_crash_while_saving_leaves_no_checkpoint(tmp_path, monkeypatch):
    model = _trained_model()
    manager = CheckpointManager(tmp_path)
    manager.save(model, {"step": 1})

    def crash(path):
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing, "_write_optimizer_variables", lambda m, p: crash(p))
    with pytest.raises(OSError, match="disk full"):
        manager.save(model, {"step": 2})
    assert [c.step for c in manager.checkpoints()] == [1]
    assert os.listdir(tmp_path) == ["ckpt-000000-step-000000001"]


def test_leftovers_of_a_killed_save_are_removed(tmp_path):
    os.makedirs(tmp_path / ".tmp-ckpt-000003-step-000000009-deadbeef")
    (tmp_path / ".tmp-ckpt-000003-step-000000009-deadbeef" / "model.weights.h5").write_bytes(b"x")
    manager = CheckpointManager(tmp_path)
    assert manager.checkpoints() == [] and os.listdir(tmp_path) == []


def test_optimizer_mismatch_is_a_clear_error(tmp_path):
    model = _trained_model()
    checkpoint = CheckpointManager(tmp_path).save(model, {"step": 1})
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    other.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    with pytest.raises(ValueError, match="optimizer variables"):
        CheckpointManager(tmp_path).restore(checkpoint, other)
