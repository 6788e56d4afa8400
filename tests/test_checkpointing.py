"""Atomic training-state checkpoints: exact round trip, pruning, corruption detection,
optimizer state by path, directories shared between processes."""

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading

import keras
import numpy as np
import pytest

from keras_glam.training import checkpointing
from keras_glam.training.checkpointing import CheckpointManager
from keras_glam.training.checkpointing import CorruptCheckpointError
from keras_glam.optimizers.skip_nonfinite import SkipNonFiniteSteps


def _trained_model(seed=0):
    """Named layers and optimizer: auto-generated names would differ between two models built
    in one process, and optimizer state is restored by variable path."""
    keras.utils.set_random_seed(seed)
    layers = [keras.layers.Dense(4, name="hidden"), keras.layers.Dense(1, name="out")]
    model = keras.Sequential([keras.Input((3,)), *layers], name="net")
    model.compile(
        optimizer=SkipNonFiniteSteps(keras.optimizers.Adam(0.01, name="adam")), loss="mse"
    )
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


def _flip_last_byte_of(name):
    def damage(path):
        with open(os.path.join(path, name), "r+b") as file:
            file.seek(-1, os.SEEK_END)
            last = file.read(1)
            file.seek(-1, os.SEEK_END)
            file.write(bytes([last[0] ^ 0xFF]))

    return damage


def _remove_state(path):
    os.remove(os.path.join(path, "state.json"))


def _break_state_json(path):
    with open(os.path.join(path, "state.json"), "w") as file:
        file.write("{")


def _edit_record(edit):
    def damage(path):
        state_path = os.path.join(path, "state.json")
        with open(state_path) as file:
            record = json.load(file)
        record = edit(record)
        with open(state_path, "w") as file:
            json.dump(record, file)

    return damage


def _without(key):
    return lambda record: {k: v for k, v in record.items() if k != key}


def _with(**changes):
    return lambda record: {**record, **changes}


def _with_file_entry(name, entry):
    return lambda record: {**record, "files": {**record["files"], name: entry}}


def _empty_manifest_and_no_weights(path):
    _edit_record(_with(files={}))(path)
    os.remove(os.path.join(path, "model.weights.h5"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncate_weights, "bytes"),
        (_flip_last_byte_of("optimizer.npz"), "SHA-256"),
        (_remove_state, "state.json is missing"),
        (_break_state_json, "unreadable"),
        # Malformed or inconsistent records are corrupt too, with the reason.
        (_edit_record(lambda record: [record]), "not a format-1 checkpoint record"),
        (_edit_record(_without("files")), "no manifest of the files"),
        (_edit_record(_with(files=["model.weights.h5"])), "no manifest of the files"),
        (_empty_manifest_and_no_weights, "manifest does not list model.weights.h5"),
        (_edit_record(_with_file_entry("optimizer.npz", 12)), "entry of optimizer.npz is"),
        (
            _edit_record(_with_file_entry("model.weights.h5", {"bytes": 10})),
            "entry of model.weights.h5 is malformed",
        ),
        (_edit_record(_with_file_entry("../notes.txt", {})), "unknown file '../notes.txt'"),
        (_edit_record(_without("state")), "holds no state dict"),
        (_edit_record(_with(state=[2])), "holds no state dict"),
        (_edit_record(_with(state={"data_position": 2})), "records step None"),
        (_edit_record(_with(state={"step": "2"})), "records step '2'"),
        (_edit_record(_with(sequence=7)), "records sequence 7, the directory name says 1"),
        (_edit_record(_without("sequence")), "records sequence None"),
        (_edit_record(_with(model_variables=[["net/out/kernel", "4x1"]])), "model variables"),
    ],
    ids=[
        "truncated",
        "flipped_byte",
        "no_state",
        "bad_json",
        "not_a_dict",
        "no_files",
        "files_a_list",
        "empty_manifest",
        "entry_not_a_dict",
        "entry_without_checksum",
        "unknown_file",
        "no_state_dict",
        "state_a_list",
        "state_without_step",
        "step_a_string",
        "other_sequence",
        "no_sequence",
        "malformed_variable_list",
    ],
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
        assert manager.valid_checkpoints() == [older]
    assert f"Skipping checkpoint {newer.path}: " in caplog.text and message in caplog.text


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


def test_optimizer_mismatch_is_a_clear_error(tmp_path):
    model = _trained_model()
    checkpoint = CheckpointManager(tmp_path).save(model, {"step": 1})
    layers = [keras.layers.Dense(4, name="hidden"), keras.layers.Dense(1, name="out")]
    other = keras.Sequential([keras.Input((3,)), *layers], name="net")
    other.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    with pytest.raises(ValueError, match="13 optimizer variables do not match the 2 "):
        CheckpointManager(tmp_path).restore(checkpoint, other)


def test_a_state_the_driver_refuses_makes_the_checkpoint_corrupt(tmp_path):
    model = _trained_model()

    def validate_state(state):
        if not isinstance(state.get("data_position"), int):
            raise ValueError("'data_position' is not an integer")

    manager = CheckpointManager(tmp_path, validate_state=validate_state)
    older = manager.save(model, {"step": 1, "data_position": 1})
    newer = manager.save(model, {"step": 2, "data_position": "two"})
    with pytest.raises(CorruptCheckpointError, match="cannot be resumed from.*'data_position'"):
        manager.verify(newer)
    assert manager.latest() == older


def test_save_refuses_a_state_without_an_integer_step(tmp_path):
    model = _trained_model()
    for state in ({"data_position": 3}, {"step": "3"}, {"step": -1}, [3]):
        with pytest.raises(ValueError, match="'step' is an integer >= 0"):
            CheckpointManager(tmp_path).save(model, state)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Extra files (a data stream's state) written into the same atomic checkpoint.


def _write_data_state(directory, content=b"position 7"):
    with open(os.path.join(directory, "data_iterator.bin"), "wb") as file:
        file.write(content)
    with open(os.path.join(directory, "data_iterator.json"), "w") as file:
        json.dump({"position": 7}, file)
    return ["data_iterator.json", "data_iterator.bin"]


def test_extra_files_are_committed_listed_and_verified(tmp_path):
    manager = CheckpointManager(tmp_path)
    checkpoint = manager.save(_trained_model(), {"step": 7}, extra_files=_write_data_state)
    with open(os.path.join(checkpoint.path, "state.json")) as file:
        record = json.load(file)
    assert record["extra_files"] == ["data_iterator.bin", "data_iterator.json"]
    assert set(record["files"]) == {
        "model.weights.h5", "optimizer.npz", "data_iterator.bin", "data_iterator.json"
    }
    with open(os.path.join(checkpoint.path, "data_iterator.bin"), "rb") as file:
        assert file.read() == b"position 7"
    assert manager.latest() == checkpoint
    assert checkpointing.listed_files(checkpoint) == sorted(os.listdir(checkpoint.path))
    assert manager.restore(checkpoint, _trained_model(seed=1)) == {"step": 7}


def _remove_data_state(path):
    os.remove(os.path.join(path, "data_iterator.bin"))


def _unlist_extra_file(record):
    files = {k: v for k, v in record["files"].items() if k != "data_iterator.bin"}
    return {**record, "files": files}


@pytest.mark.parametrize(
    "damage, message",
    [
        (_flip_last_byte_of("data_iterator.bin"), "data_iterator.bin does not match its SHA-256"),
        (_remove_data_state, "data_iterator.bin is missing"),
        (_edit_record(_unlist_extra_file), "the manifest does not list data_iterator.bin"),
        (_edit_record(_with(extra_files=["data_iterator.json"])), "unknown file 'data_iterator"),
        (_edit_record(_with(extra_files=["../elsewhere"])), "malformed list of extra files"),
        (_edit_record(_with(extra_files="data_iterator.bin")), "malformed list of extra files"),
    ],
    ids=["tampered", "missing", "unlisted", "undeclared", "path_outside", "not_a_list"],
)
def test_damaged_extra_files_make_the_checkpoint_corrupt(tmp_path, caplog, damage, message):
    model = _trained_model()
    manager = CheckpointManager(tmp_path)
    older = manager.save(model, {"step": 1}, extra_files=_write_data_state)
    newer = manager.save(model, {"step": 2}, extra_files=_write_data_state)
    damage(newer.path)
    with pytest.raises(CorruptCheckpointError, match=message):
        manager.verify(newer)
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        assert manager.latest() == older


@pytest.mark.parametrize("name", ["state.json", "optimizer.npz", "../outside", ".hidden"])
def test_extra_files_may_not_shadow_or_escape_the_checkpoint(tmp_path, name):
    def write(directory):
        return [name]

    with pytest.raises(ValueError, match=f"`extra_files` returned '{re.escape(name)}'"):
        CheckpointManager(tmp_path).save(_trained_model(), {"step": 1}, extra_files=write)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Optimizer state is restored by variable path.


class _TwoBranches(keras.Model):
    """`left(x) + 2 right(x)`, with the two layers tracked in the order given."""

    def __init__(self, order=("left", "right"), right_name="right"):
        super().__init__(name="two_branches")
        names = {"left": "left", "right": right_name}
        for attribute in order:
            setattr(self, attribute, keras.layers.Dense(2, use_bias=False, name=names[attribute]))

    def call(self, x):
        return self.left(x) + 2 * self.right(x)


def _built(model, seed, optimizer=None, reverse_optimizer=False):
    keras.utils.set_random_seed(seed)
    model(np.zeros((1, 2), "float32"))
    model.compile(optimizer=optimizer or keras.optimizers.Adam(0.1, name="adam"), loss="mse")
    variables = model.trainable_variables
    model.optimizer.build(variables[::-1] if reverse_optimizer else variables)
    return model


def _by_path(variables):
    return {variable.path: np.array(variable.numpy()) for variable in variables}


def _trained_two_branches():
    model = _built(_TwoBranches(), seed=0)
    x = np.random.default_rng(0).normal(size=(8, 2)).astype("float32")
    model.fit(x, x, epochs=3, verbose=0)
    return model


def test_optimizer_state_is_restored_by_path_not_position(tmp_path):
    trained = _trained_two_branches()
    checkpoint = CheckpointManager(tmp_path).save(trained, {"step": 3})
    # The same model whose optimizer holds its slots in the other order (same shapes).
    other = _built(_TwoBranches(), seed=1, reverse_optimizer=True)
    paths = [variable.path for variable in other.optimizer.variables]
    assert paths != [variable.path for variable in trained.optimizer.variables]
    assert sorted(paths) == sorted(variable.path for variable in trained.optimizer.variables)

    CheckpointManager(tmp_path).restore(checkpoint, other)
    expected = _by_path(trained.weights + trained.optimizer.variables)
    actual = _by_path(other.weights + other.optimizer.variables)
    assert set(actual) == set(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(actual[path], value, err_msg=path)


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: _built(_TwoBranches(("right", "left")), seed=1),
            r"2 model variables do not match the model's 2: variable 0 is "
            r"'two_branches/right/kernel' \(2, 2\) in the model, 'two_branches/left/kernel' "
            r"\(2, 2\) in the checkpoint",
        ),
        (
            lambda: _built(_TwoBranches(right_name="other"), seed=1),
            r"variable 1 is 'two_branches/other/kernel' \(2, 2\) in the model, "
            r"'two_branches/right/kernel' \(2, 2\) in the checkpoint",
        ),
        (
            # Adamax keeps two slots of the same shapes as Adam's, so positions would match.
            lambda: _built(_TwoBranches(), 1, keras.optimizers.Adamax(0.1, name="adam")),
            r"optimizer variables do not match the 6 of the model's optimizer \(adam\): "
            r"the model's 'adam/two_branches_left_kernel_norm' is not in the checkpoint",
        ),
    ],
    ids=["layers_in_another_order", "renamed_layer", "another_optimizer"],
)
def test_other_variables_are_refused_naming_the_first_mismatch(tmp_path, build, message):
    checkpoint = CheckpointManager(tmp_path).save(_trained_two_branches(), {"step": 1})
    model = build()
    before = _by_path(model.weights + model.optimizer.variables)
    with pytest.raises(ValueError, match=message):
        CheckpointManager(tmp_path).restore(checkpoint, model)
    after = _by_path(model.weights + model.optimizer.variables)
    for path, value in before.items():  # refused before anything was loaded
        np.testing.assert_array_equal(after[path], value, err_msg=path)


# ------------------------------------------------------------------------------------------------
# A directory shared between processes: only provably stale temporary entries are removed.


def test_a_new_manager_leaves_a_save_in_progress_in_this_process_alone(tmp_path, monkeypatch):
    model = _trained_model()
    writing = threading.Event()
    resume = threading.Event()
    write_optimizer_variables = checkpointing._write_optimizer_variables

    def slow_write(model, path):
        writing.set()
        assert resume.wait(30)
        write_optimizer_variables(model, path)

    monkeypatch.setattr(checkpointing, "_write_optimizer_variables", slow_write)
    saved = []
    saver = threading.Thread(
        target=lambda: saved.append(CheckpointManager(tmp_path).save(model, {"step": 1}))
    )
    saver.start()
    assert writing.wait(30)
    [temporary] = os.listdir(tmp_path)
    CheckpointManager(tmp_path)  # another manager of the directory, meanwhile
    assert os.listdir(tmp_path) == [temporary]
    resume.set()
    saver.join(30)
    assert [checkpoint.step for checkpoint in saved] == [1]
    assert CheckpointManager(tmp_path).latest() == saved[0]


_BLOCKED_WRITER = textwrap.dedent(
    """
    import shutil, sys
    from keras_glam.training.checkpointing import CheckpointManager

    copy = shutil.copyfile

    def copy_then_block(source, target):
        copy(source, target)
        print("copying", flush=True)
        sys.stdin.readline()  # blocks until the test kills this process

    shutil.copyfile = copy_then_block
    CheckpointManager(sys.argv[1]).adopt(sys.argv[2], "ckpt-000000-step-000000001")
    """
)


@pytest.mark.slow
def test_temporary_entries_of_a_live_writer_survive_and_of_a_dead_one_go(tmp_path):
    directory, source = tmp_path / "checkpoints", tmp_path / "download"
    directory.mkdir()
    source.mkdir()
    (source / "state.json").write_text("{}")
    unknown_writer = directory / ".tmp-ckpt-000003-step-000000009-deadbeef"  # no pid@host
    unknown_writer.mkdir()
    writer = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED_WRITER, str(directory), str(source)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "KERAS_BACKEND": "jax"},
    )
    try:
        assert writer.stdout.readline() == "copying\n"
        [in_progress] = [name for name in os.listdir(directory) if name != unknown_writer.name]
        CheckpointManager(directory)  # a second run sharing the directory
        assert sorted(os.listdir(directory)) == sorted([in_progress, unknown_writer.name])
        assert in_progress.startswith(f".tmp-{writer.pid}@")
    finally:
        writer.kill()
        writer.wait()
    CheckpointManager(directory)  # the writer is dead: its leftovers go
    assert os.listdir(directory) == [unknown_writer.name]
