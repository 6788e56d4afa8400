"""Atomic training-state checkpoints: weights, optimizer state and the driver's state.

A checkpoint is a directory `ckpt-<sequence>-step-<step>` holding

- `model.weights.h5`: every model variable (trainable and not: MoE routing statistics too),
- `optimizer.npz`: every optimizer variable (slots, iteration counters, skipped-step count),
- `state.json`: the training driver's state (step, data position, seeds, ...), the checkpoint's
  sequence number, and a manifest with the size and SHA-256 of the two other files.

Writing is atomic: the files go into a hidden temporary directory, each is fsynced, the
directory is renamed into place with `os.replace` and its parent fsynced. A crash (even
`kill -9` or a power cut) leaves either the complete checkpoint or none; temporary directories
left behind by a crash are removed by the next `CheckpointManager`. A checkpoint whose files do
not match its manifest (a truncated copy, a bad disk) is reported and skipped for the next older
one. Checkpoints are ordered by their sequence number, not their step, so that a rollback to an
earlier step makes the rolled-back state the newest checkpoint.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from typing import NamedTuple

import keras
import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"
STATE_FILE = "state.json"
_NAME_PATTERN = re.compile(r"^ckpt-(\d{6,})-step-(\d{9,})$")
_TEMPORARY_PREFIX = ".tmp-"


def parse_checkpoint_name(name):
    """`(sequence, step)` of a checkpoint directory name ("ckpt-000003-step-000000600"), or None."""
    match = _NAME_PATTERN.match(name)
    return (int(match[1]), int(match[2])) if match else None


class CorruptCheckpointError(ValueError):
    """A checkpoint directory is incomplete or its files do not match its manifest."""


class Checkpoint(NamedTuple):
    """A committed checkpoint directory.

    Attributes:
        path: str, the checkpoint directory.
        sequence: int, its position in write order (larger is newer).
        step: int, the training step it holds.
    """

    path: str
    sequence: int
    step: int


class CheckpointManager:
    """Writes, lists, verifies and restores training-state checkpoints in one directory.

    Args:
        directory: where checkpoints live (created if needed).
        max_to_keep: int >= 1, how many of the newest checkpoints to keep.

    Example:
    ```python
    manager = CheckpointManager("run/checkpoints", max_to_keep=3)
    manager.save(lm, {"step": 100, "data_position": 100})
    checkpoint = manager.latest()
    state = manager.restore(checkpoint, lm)
    ```
    """

    def __init__(self, directory, max_to_keep=3):
        if not (isinstance(max_to_keep, int) and max_to_keep >= 1):
            raise ValueError(f"`max_to_keep` must be an integer >= 1. Received: {max_to_keep!r}")
        self.directory = os.fspath(directory)
        self.max_to_keep = max_to_keep
        os.makedirs(self.directory, exist_ok=True)
        self._remove_temporary_directories()
        self._held_paths = set()
        self._held_lock = threading.Lock()

    def hold(self, checkpoint):
        """Keep `checkpoint` through pruning until `release`: its copy elsewhere is not confirmed.

        Pruning still keeps the `max_to_keep` newest checkpoints; held older ones stay in
        addition. Safe to call from any thread.
        """
        with self._held_lock:
            self._held_paths.add(checkpoint.path)

    def release(self, checkpoint):
        """Undo `hold`: the next `save` may prune `checkpoint` again. Safe from any thread."""
        with self._held_lock:
            self._held_paths.discard(checkpoint.path)

    def adopt(self, source, name):
        """Install a copy of a checkpoint directory from elsewhere (a download) as `name`.

        Every regular file of `source` is copied into a temporary directory and fsynced; the
        copy is verified against its `state.json` manifest and renamed into place, so a crash
        leaves the complete checkpoint or none. `source` is left as it is.

        Args:
            source: a directory holding a checkpoint's files.
            name: the checkpoint's directory name, "ckpt-<sequence>-step-<step>".

        Returns:
            The new `Checkpoint`.

        Raises:
            ValueError: `name` is not a checkpoint name.
            FileExistsError: this directory already holds a checkpoint called `name`.
            CorruptCheckpointError: the copy does not pass `verify`.
        """
        parsed = parse_checkpoint_name(name)
        if parsed is None:
            raise ValueError(
                f"'{name}' is not a checkpoint name: expected 'ckpt-<sequence>-step-<step>' as "
                "`save` writes it."
            )
        final = os.path.join(self.directory, name)
        if os.path.exists(final):
            raise FileExistsError(
                f"{final} already exists: a checkpoint is never overwritten. Adopt into another "
                "directory or remove the existing checkpoint first."
            )
        temporary = os.path.join(
            self.directory, f"{_TEMPORARY_PREFIX}adopt-{name}-{uuid.uuid4().hex}"
        )
        os.makedirs(temporary)
        try:
            with os.scandir(source) as entries:
                for entry in entries:
                    if entry.is_file():
                        copy = os.path.join(temporary, entry.name)
                        shutil.copyfile(entry.path, copy)
                        _fsync(copy)
            self.verify(Checkpoint(temporary, *parsed))
            _fsync(temporary)
            os.replace(temporary, final)
            _fsync(self.directory)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        return Checkpoint(final, *parsed)

    def checkpoints(self):
        """Committed checkpoints, newest first (not verified: see `verify`)."""
        found = []
        for name in os.listdir(self.directory):
            match = _NAME_PATTERN.match(name)
            if match and os.path.isdir(os.path.join(self.directory, name)):
                found.append(
                    Checkpoint(
                        os.path.join(self.directory, name), int(match[1]), int(match[2])
                    )
                )
        return sorted(found, key=lambda checkpoint: checkpoint.sequence, reverse=True)

    def valid_checkpoints(self):
        """Committed checkpoints that pass `verify`, newest first; the others are reported."""
        return list(self._verified_checkpoints())

    def latest(self):
        """The newest checkpoint that passes `verify`, or None. Corrupt ones are reported."""
        return next(self._verified_checkpoints(), None)

    def _verified_checkpoints(self):
        for checkpoint in self.checkpoints():
            try:
                self.verify(checkpoint)
            except CorruptCheckpointError as error:
                logger.warning(
                    "Skipping checkpoint %s: %s. Falling back to an older checkpoint.",
                    checkpoint.path,
                    error,
                )
                continue
            yield checkpoint

    def verify(self, checkpoint):
        """Check that `state.json` parses and every file matches its size and SHA-256.

        Returns:
            The checkpoint's state dict.

        Raises:
            CorruptCheckpointError: naming what is missing or does not match.
        """
        state_path = os.path.join(checkpoint.path, STATE_FILE)
        try:
            with open(state_path, encoding="utf-8") as file:
                record = json.load(file)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{STATE_FILE} is missing") from None
        except (OSError, ValueError) as error:
            raise CorruptCheckpointError(f"{STATE_FILE} is unreadable ({error})") from None
        if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
            raise CorruptCheckpointError(
                f"{STATE_FILE} is not a format-{FORMAT_VERSION} checkpoint record"
            )
        for name, expected in record["files"].items():
            path = os.path.join(checkpoint.path, name)
            if not os.path.isfile(path):
                raise CorruptCheckpointError(f"{name} is missing")
            size = os.path.getsize(path)
            if size != expected["bytes"]:
                raise CorruptCheckpointError(
                    f"{name} has {size} bytes, the manifest says {expected['bytes']} "
                    "(truncated or partially copied)"
                )
            if file_sha256(path) != expected["sha256"]:
                raise CorruptCheckpointError(f"{name} does not match its SHA-256 checksum")
        return record["state"]

    def save(self, model, state):
        """Atomically write `model`'s weights, its optimizer's variables and `state`.

        Args:
            model: a built Keras model; its optimizer (if any) must be built.
            state: JSON-serialisable dict of the training driver's state; must hold `step`.

        Returns:
            The new `Checkpoint`.
        """
        step = int(state["step"])
        existing = self.checkpoints()
        sequence = existing[0].sequence + 1 if existing else 0
        name = f"ckpt-{sequence:06d}-step-{step:09d}"
        temporary = os.path.join(self.directory, f"{_TEMPORARY_PREFIX}{name}-{uuid.uuid4().hex}")
        os.makedirs(temporary)
        try:
            model.save_weights(os.path.join(temporary, WEIGHTS_FILE))
            _write_optimizer_variables(model, os.path.join(temporary, OPTIMIZER_FILE))
            files = {}
            for file_name in (WEIGHTS_FILE, OPTIMIZER_FILE):
                path = os.path.join(temporary, file_name)
                _fsync(path)
                files[file_name] = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
            record = {
                "format_version": FORMAT_VERSION,
                "sequence": sequence,
                "files": files,
                "state": state,
            }
            state_path = os.path.join(temporary, STATE_FILE)
            with open(state_path, "w", encoding="utf-8") as file:
                json.dump(record, file, indent=2, sort_keys=True)
                file.flush()
                os.fsync(file.fileno())
            _fsync(temporary)
            final = os.path.join(self.directory, name)
            os.replace(temporary, final)
            _fsync(self.directory)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        self._prune()
        return Checkpoint(final, sequence, step)

    def restore(self, checkpoint, model):
        """Verify `checkpoint`, load it into `model` (weights and optimizer) and return its state.

        Raises:
            CorruptCheckpointError: if the checkpoint fails `verify`.
            ValueError: if the checkpoint does not fit the model or its optimizer.
        """
        state = self.verify(checkpoint)
        model.load_weights(os.path.join(checkpoint.path, WEIGHTS_FILE))
        _read_optimizer_variables(model, os.path.join(checkpoint.path, OPTIMIZER_FILE))
        return state

    def _prune(self):
        with self._held_lock:
            held = set(self._held_paths)
        for checkpoint in self.checkpoints()[self.max_to_keep :]:
            if checkpoint.path in held:
                continue
            # Renamed first so that a crash mid-deletion never leaves a half-deleted
            # directory under a checkpoint's name.
            doomed = os.path.join(
                self.directory,
                f"{_TEMPORARY_PREFIX}delete-{os.path.basename(checkpoint.path)}-{uuid.uuid4().hex}",
            )
            os.replace(checkpoint.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def _remove_temporary_directories(self):
        for name in os.listdir(self.directory):
            if name.startswith(_TEMPORARY_PREFIX):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)


def _optimizer_of(model):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return None
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    return optimizer


def _write_optimizer_variables(model, path):
    optimizer = _optimizer_of(model)
    arrays = {}
    if optimizer is not None:
        for index, variable in enumerate(optimizer.variables):
            value = keras.ops.convert_to_numpy(variable)
            if value.dtype.kind == "V" or str(value.dtype) == "bfloat16":
                value = value.astype("float32")  # Exact: bfloat16 values are float32 values.
            arrays[f"{index:05d}"] = value
        arrays["paths"] = np.array([variable.path for variable in optimizer.variables])
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def _read_optimizer_variables(model, path):
    optimizer = _optimizer_of(model)
    with np.load(path, allow_pickle=False) as arrays:
        saved_paths = list(arrays["paths"]) if "paths" in arrays.files else []
        if optimizer is None:
            if saved_paths:
                raise ValueError(
                    "The checkpoint holds optimizer state but the model has no optimizer: "
                    "compile the model (with the optimizer it was trained with) before restoring."
                )
            return
        variables = optimizer.variables
        if len(saved_paths) != len(variables):
            raise ValueError(
                f"The checkpoint holds {len(saved_paths)} optimizer variables but the model's "
                f"optimizer ({optimizer.name}) has {len(variables)}. Compile the model with the "
                "optimizer the checkpoint was written with (same class and settings)."
            )
        for index, variable in enumerate(variables):
            value = arrays[f"{index:05d}"]
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"Optimizer variable {index} ('{variable.path}') has shape "
                    f"{tuple(variable.shape)}, the checkpoint's ('{saved_paths[index]}') "
                    f"{tuple(value.shape)}: the checkpoint belongs to another model or optimizer."
                )
            variable.assign(value)


def file_sha256(path):
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path):
    """Flush a file's or a directory's contents (a directory: its entries) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
