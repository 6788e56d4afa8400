"""Atomic training-state checkpoints: weights, optimizer state and the driver's state.

A checkpoint is a directory `ckpt-<sequence>-step-<step>` holding

- `model.weights.h5`: every model variable (trainable and not: MoE routing statistics too),
- `optimizer.npz`: every optimizer variable (slots, iteration counters, skipped-step count),
- `state.json`: the training driver's state (step, data position, seeds, ...), the checkpoint's
  sequence number, and a manifest with the size and SHA-256 of every other file;
- optionally, files a caller adds to the same atomic write (`save(..., extra_files=...)`), e.g.
  the data stream's position (`keras_glam.data.streaming.DataIterator.save`): `state.json`
  names them (`extra_files`) and the manifest checksums them like the others.

Writing is atomic: the files go into a hidden temporary directory, each is fsynced, the
directory is renamed into place with `os.replace` and its parent fsynced. A crash (even
`kill -9` or a power cut) leaves either the complete checkpoint or none.

Several processes may share a directory (a second run started by mistake, a tool listing it):
a temporary entry's name says which process writes it (`.tmp-<pid>@<host>-<nonce>-...`), and a
new `CheckpointManager` removes only entries whose writer is provably gone: a dead process of
this machine, or this process itself when no save of it is in progress. Entries of live
processes, of other machines (a shared file system) and of unknown writers are left alone.

A checkpoint is trusted only when everything about it checks out: `state.json` parses, is a
record of this format whose sequence and step are those of the directory's name, its manifest
lists exactly the files a checkpoint needs and the extra files the record names, and each matches
its size and SHA-256. Anything
else (a truncated copy, a bad disk, a hand-edited record) makes it corrupt: it is reported with
the reason and skipped for the next older one. Checkpoints are ordered by their sequence number,
not their step, so that a rollback to an earlier step makes the rolled-back state the newest
checkpoint.

Restoring checks the variables before loading anything. Optimizer variables are stored under
their Keras variable paths and restored by path; Keras' weights file matches model variables by
their position in the layer tree, so `state.json` records each one's path and shape. A model
whose variables or optimizer variables differ (another optimizer, layers renamed or built in
another order) is refused, naming the first mismatch. Auto-generated names (`dense_1`, `adam_2`)
depend on how many layers were created before, so restore into a model built the same way (in a
fresh process) or name its layers and optimizer.
"""

import collections
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import uuid
from typing import NamedTuple

import keras
import numpy as np

from keras_glam.utils.atomic_files import durable_replace
from keras_glam.utils.atomic_files import file_sha256
from keras_glam.utils.atomic_files import fsync_path
from keras_glam.utils.checks import check_positive_integers

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"
STATE_FILE = "state.json"
# Every file a checkpoint needs besides state.json; its manifest must list exactly these.
CHECKPOINT_FILES = (WEIGHTS_FILE, OPTIMIZER_FILE)
_NAME_PATTERN = re.compile(r"^ckpt-(\d{6,})-step-(\d{9,})$")
_TEMPORARY_PREFIX = ".tmp-"
_TEMPORARY_PATTERN = re.compile(
    r"^\.tmp-(?P<pid>\d+)@(?P<host>[A-Za-z0-9._+-]+?)-(?P<nonce>[0-9a-f]{32})-"
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A file name a checkpoint may hold: no directory, not hidden (`..`, `a/b`, `.x` are not).
PLAIN_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
# Temporary entries this process is writing or deleting right now, by name: another manager of
# the same process must leave them alone.
_ENTRIES_IN_USE = set()
_ENTRIES_LOCK = threading.Lock()


def parse_checkpoint_name(name):
    """`(sequence, step)` of a checkpoint directory name ("ckpt-000003-step-000000600"), or None."""
    match = _NAME_PATTERN.match(name)
    return (int(match[1]), int(match[2])) if match else None


class CorruptCheckpointError(ValueError):
    """A checkpoint directory is unreadable, incomplete, inconsistent or does not match its
    manifest; the message says why."""


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
        validate_state: optional callable of a checkpoint's state dict that raises `ValueError`
            when the training driver could not resume from it; `verify` then reports the
            checkpoint as corrupt (so `latest` falls back to an older one).

    Example:
    ```python
    manager = CheckpointManager("run/checkpoints", max_to_keep=3)
    manager.save(lm, {"step": 100, "data_position": 100})
    checkpoint = manager.latest()
    state = manager.restore(checkpoint, lm)
    ```
    """

    def __init__(self, directory, max_to_keep=3, validate_state=None):
        check_positive_integers(max_to_keep=max_to_keep)
        self.directory = os.fspath(directory)
        self.max_to_keep = max_to_keep
        self.validate_state = validate_state
        os.makedirs(self.directory, exist_ok=True)
        self._remove_stale_temporary_entries()
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
        with self._temporary_entry(f"adopt-{name}") as temporary:
            os.makedirs(temporary)
            with os.scandir(source) as entries:
                for entry in entries:
                    if entry.is_file():
                        copy = os.path.join(temporary, entry.name)
                        shutil.copyfile(entry.path, copy)
                        fsync_path(copy)
            self.verify(Checkpoint(temporary, *parsed))
            durable_replace(temporary, final)
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
        """Check everything about `checkpoint` that `restore` relies on (module docstring).

        Returns:
            The checkpoint's state dict.

        Raises:
            CorruptCheckpointError: naming what is missing, unreadable or does not match.
        """
        return self._verified_record(checkpoint)["state"]

    def _verified_record(self, checkpoint):
        """`verify`, returning the whole `state.json` record."""
        record = _read_record(checkpoint.path)
        state = record.get("state")
        if not isinstance(state, dict):
            raise CorruptCheckpointError(f"{STATE_FILE} holds no state dict")
        for field, recorded, named in (
            ("sequence", record.get("sequence"), checkpoint.sequence),
            ("step", state.get("step"), checkpoint.step),
        ):
            if not _is_integer(recorded) or recorded != named:
                raise CorruptCheckpointError(
                    f"{STATE_FILE} records {field} {recorded!r}, the directory name says {named}"
                )
        files = record.get("files")
        if not isinstance(files, dict):
            raise CorruptCheckpointError(f"{STATE_FILE} has no manifest of the files")
        extra_files = record.get("extra_files", [])  # Absent from checkpoints without any.
        if not (
            isinstance(extra_files, list)
            and all(isinstance(name, str) and PLAIN_FILE_NAME.fullmatch(name) for name in extra_files)
        ):
            raise CorruptCheckpointError(f"{STATE_FILE} has a malformed list of extra files")
        expected = (*CHECKPOINT_FILES, *extra_files)
        for name in expected:
            if name not in files:
                raise CorruptCheckpointError(f"the manifest does not list {name}")
        for name in files:
            if name not in expected:
                raise CorruptCheckpointError(f"the manifest lists an unknown file {name!r}")
        for name in expected:
            _verify_file(os.path.join(checkpoint.path, name), name, files[name])
        # Absent from checkpoints written before it was recorded.
        if not _is_variable_list(record.get("model_variables", [])):
            raise CorruptCheckpointError(
                f"{STATE_FILE} has a malformed list of model variables (expected [path, shape] "
                "pairs)"
            )
        if self.validate_state is not None:
            try:
                self.validate_state(state)
            except ValueError as error:
                raise CorruptCheckpointError(
                    f"its state cannot be resumed from ({error})"
                ) from None
        return record

    def save(self, model, state, extra_files=None):
        """Atomically write `model`'s weights, its optimizer's variables and `state`.

        Args:
            model: a built Keras model; its optimizer (if any) must be built.
            state: JSON-serialisable dict of the training driver's state; must hold `step`, an
                integer >= 0.
            extra_files: optional callable `(directory) -> [file names]` that writes more files
                into the checkpoint's (temporary) directory before it is committed, e.g.
                `lambda directory: iterator.save(directory, position=...)`. They are fsynced,
                checksummed in the manifest and verified like the checkpoint's own files.

        Returns:
            The new `Checkpoint`.
        """
        step = state.get("step") if isinstance(state, dict) else None
        if not (_is_integer(step) and step >= 0):
            raise ValueError(
                f"`state` must be a dict whose 'step' is an integer >= 0. Received: {state!r}"
            )
        existing = self.checkpoints()
        sequence = existing[0].sequence + 1 if existing else 0
        name = f"ckpt-{sequence:06d}-step-{step:09d}"
        with self._temporary_entry(name) as temporary:
            os.makedirs(temporary)
            model.save_weights(os.path.join(temporary, WEIGHTS_FILE))
            _write_optimizer_variables(model, os.path.join(temporary, OPTIMIZER_FILE))
            added = sorted(extra_files(temporary)) if extra_files is not None else []
            reserved = (*CHECKPOINT_FILES, STATE_FILE)
            for file_name in added:
                if not PLAIN_FILE_NAME.fullmatch(file_name) or file_name in reserved:
                    raise ValueError(
                        f"`extra_files` returned {file_name!r}: extra files must be plain file "
                        f"names other than {', '.join(reserved)}."
                    )
            files = {}
            for file_name in (*CHECKPOINT_FILES, *added):
                path = os.path.join(temporary, file_name)
                fsync_path(path)
                files[file_name] = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
            record = {
                "format_version": FORMAT_VERSION,
                "sequence": sequence,
                "files": files,
                "extra_files": added,
                # Keras' weights file matches variables by position in the layer tree: the
                # paths let `restore` refuse a model whose variables are others.
                "model_variables": [
                    [variable.path, list(variable.shape)] for variable in model.weights
                ],
                "state": state,
            }
            state_path = os.path.join(temporary, STATE_FILE)
            with open(state_path, "w", encoding="utf-8") as file:
                json.dump(record, file, indent=2, sort_keys=True)
                file.flush()
                os.fsync(file.fileno())
            final = os.path.join(self.directory, name)
            durable_replace(temporary, final)
        self._prune()
        return Checkpoint(final, sequence, step)

    def restore(self, checkpoint, model):
        """Verify `checkpoint`, load it into `model` (weights and optimizer) and return its state.

        The model's variables must be those the checkpoint recorded (same paths and shapes, in
        the same order); the optimizer's are matched by path. Both are checked before anything
        is loaded, so a refused checkpoint leaves the model as it was.

        Raises:
            CorruptCheckpointError: if the checkpoint fails `verify`.
            ValueError: if the checkpoint does not fit the model or its optimizer (naming the
                first variable that does not match).
        """
        record = self._verified_record(checkpoint)
        _check_model_variables(model, record.get("model_variables"))
        optimizer_values = _read_optimizer_variables(
            model, os.path.join(checkpoint.path, OPTIMIZER_FILE)
        )
        model.load_weights(os.path.join(checkpoint.path, WEIGHTS_FILE))
        for variable, value in optimizer_values:
            variable.assign(value)
        return record["state"]

    def _prune(self):
        with self._held_lock:
            held = set(self._held_paths)
        for checkpoint in self.checkpoints()[self.max_to_keep :]:
            if checkpoint.path in held:
                continue
            # Renamed first so that a crash mid-deletion never leaves a half-deleted
            # directory under a checkpoint's name.
            label = f"delete-{os.path.basename(checkpoint.path)}"
            with self._temporary_entry(label) as doomed:
                os.replace(checkpoint.path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)

    @contextlib.contextmanager
    def _temporary_entry(self, label):
        """A fresh temporary path named after this process, removed on the way out unless it
        was renamed into place; no manager of this process deletes it meanwhile."""
        name = f"{_TEMPORARY_PREFIX}{_writer_tag()}-{uuid.uuid4().hex}-{label}"
        path = os.path.join(self.directory, name)
        with _ENTRIES_LOCK:
            _ENTRIES_IN_USE.add(name)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            with _ENTRIES_LOCK:
                _ENTRIES_IN_USE.discard(name)

    def _remove_stale_temporary_entries(self):
        for name in os.listdir(self.directory):
            if not name.startswith(_TEMPORARY_PREFIX):
                continue
            reason = _why_stale(name)
            path = os.path.join(self.directory, name)
            if reason is None:
                logger.info("Leaving %s: its writer may still be using it.", path)
                continue
            logger.info("Removing %s, left by %s.", path, reason)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)


def _writer_tag():
    """`<pid>@<host>` of this process, as temporary names carry it. The host part includes the
    PID namespace where there is one, so containers sharing a hostname are told apart."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "unknown"
    with contextlib.suppress(OSError):
        host += "+" + "".join(filter(str.isdigit, os.readlink("/proc/self/ns/pid")))
    return f"{os.getpid()}@{host}"


def _why_stale(name):
    """Why the temporary entry `name` can be removed ("a dead process", ...), or None when its
    writer may still be at work (alive, on another machine, or unknown)."""
    match = _TEMPORARY_PATTERN.match(name)
    if match is None:
        return None
    pid = int(match["pid"])
    own_pid, own_host = _writer_tag().split("@", 1)
    if match["host"] != own_host:
        return None
    if pid == int(own_pid):
        with _ENTRIES_LOCK:
            in_use = name in _ENTRIES_IN_USE
        return None if in_use else "an earlier save of this process ID that did not finish"
    if os.name != "posix":
        return None  # No harmless liveness probe (os.kill would terminate the process).
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid}, which has ended"
    except OSError:
        return None  # Alive but another user's, or unknown.
    return None


def listed_files(checkpoint):
    """The files of a checkpoint: `state.json` and every file its manifest lists (the
    checkpoint's own and its extra files), sorted. Nothing is verified (see
    `CheckpointManager.verify`).

    Raises:
        CorruptCheckpointError: `state.json` is missing, unreadable or has no manifest.
    """
    files = _read_record(checkpoint.path).get("files")
    if not isinstance(files, dict):
        raise CorruptCheckpointError(f"{STATE_FILE} has no manifest of the files")
    return sorted([STATE_FILE, *files])


def _is_integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_variable_list(value):
    """Whether `value` is a list of `[path, shape]` pairs, as `save` records model variables."""
    return isinstance(value, list) and all(
        isinstance(entry, list)
        and len(entry) == 2
        and isinstance(entry[0], str)
        and isinstance(entry[1], list)
        and all(_is_integer(size) for size in entry[1])
        for entry in value
    )


def _read_record(directory):
    """The parsed `state.json` of a checkpoint directory, if it is a record of this format."""
    try:
        with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as file:
            record = json.load(file)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{STATE_FILE} is missing") from None
    except (OSError, ValueError, RecursionError) as error:
        raise CorruptCheckpointError(f"{STATE_FILE} is unreadable ({error})") from None
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{STATE_FILE} is not a format-{FORMAT_VERSION} checkpoint record"
        )
    return record


def _verify_file(path, name, expected):
    """Check one file of a checkpoint against its manifest entry `{"bytes", "sha256"}`."""
    if not (
        isinstance(expected, dict)
        and _is_integer(expected.get("bytes"))
        and isinstance(expected.get("sha256"), str)
        and _SHA256.fullmatch(expected["sha256"])
    ):
        raise CorruptCheckpointError(f"the manifest entry of {name} is malformed: {expected!r}")
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


def _optimizer_of(model):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return None
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    return optimizer


def _check_model_variables(model, recorded):
    """Refuse a model whose variables are not the `[path, shape]` list a checkpoint recorded
    (None: an older checkpoint that recorded none)."""
    if recorded is None:
        return
    actual = [[variable.path, list(variable.shape)] for variable in model.weights]
    if actual == recorded:
        return
    index = next(
        (i for i, (mine, theirs) in enumerate(zip(actual, recorded)) if mine != theirs),
        min(len(actual), len(recorded)),
    )

    def describe(entries):
        if index >= len(entries):
            return "nothing"
        path, shape = entries[index]
        return f"'{path}' {tuple(shape)}"

    raise ValueError(
        f"The checkpoint's {len(recorded)} model variables do not match the model's "
        f"{len(actual)}: variable {index} is {describe(actual)} in the model, "
        f"{describe(recorded)} in the checkpoint. Restore into a model built with the same "
        "architecture and layer names as the one that wrote the checkpoint."
    )


def _write_optimizer_variables(model, path):
    optimizer = _optimizer_of(model)
    arrays = {}
    if optimizer is not None:
        paths = [variable.path for variable in optimizer.variables]
        repeated = [name for name, count in collections.Counter(paths).items() if count > 1]
        if repeated:
            raise ValueError(
                f"The optimizer ({optimizer.name}) has several variables at path '{repeated[0]}', "
                "so they could not be told apart on restore. Give the model's layers and the "
                "optimizers unique names."
            )
        for index, variable in enumerate(optimizer.variables):
            value = keras.ops.convert_to_numpy(variable)
            if value.dtype.kind == "V" or str(value.dtype) == "bfloat16":
                value = value.astype("float32")  # Exact: bfloat16 values are float32 values.
            arrays[f"{index:05d}"] = value
        arrays["paths"] = np.array(paths)
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def _read_optimizer_variables(model, path):
    """`[(variable, value)]` for every variable of `model`'s optimizer, matched by path.

    Raises:
        ValueError: the checkpoint's optimizer variables are not the optimizer's (another
            optimizer, other settings or other layers), naming the first mismatch.
    """
    optimizer = _optimizer_of(model)
    with np.load(path, allow_pickle=False) as arrays:
        saved_paths = [str(name) for name in arrays["paths"]] if "paths" in arrays.files else []
        if optimizer is None:
            if saved_paths:
                raise ValueError(
                    "The checkpoint holds optimizer state but the model has no optimizer: "
                    "compile the model (with the optimizer it was trained with) before restoring."
                )
            return []
        saved = {name: index for index, name in enumerate(saved_paths)}
        variables = optimizer.variables
        pairs = []
        mismatch = None
        for variable in variables:
            index = saved.pop(variable.path, None)
            if index is None:
                mismatch = f"the model's '{variable.path}' is not in the checkpoint"
                break
            value = arrays[f"{index:05d}"]
            if tuple(value.shape) != tuple(variable.shape):
                mismatch = (
                    f"'{variable.path}' has shape {tuple(variable.shape)} in the model, "
                    f"{tuple(value.shape)} in the checkpoint"
                )
                break
            pairs.append((variable, value))
        if mismatch is None and saved:
            mismatch = f"the checkpoint's '{min(saved, key=saved.get)}' is not in the model"
        if mismatch is not None:
            raise ValueError(
                f"The checkpoint's {len(saved_paths)} optimizer variables do not match the "
                f"{len(variables)} of the model's optimizer ({optimizer.name}): {mismatch}. "
                "Compile the model with the optimizer the checkpoint was written with (same "
                "class and settings) and build it with the same layer names."
            )
        return pairs
