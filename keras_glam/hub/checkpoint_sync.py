"""Training checkpoints on the Hugging Face Hub: the repository layout, pushing and pulling back.

`HubCheckpoint` (`keras_glam.hub.checkpoint_callback`) mirrors the checkpoints of a
`CheckpointManager` directory to a Hub repository, one commit per checkpoint. Every commit is a
complete Keras preset whose weights are the checkpoint's, plus the training state to resume from:

```
README.md                      keras_glam's model card (step, training loss)
config.json, task.json, ...    the preset: `GLaMCausalLM.from_preset("hf://org/run")` loads the
model.weights.h5               newest pushed weights
checkpoints/<name>/            a checkpoint directory under its local name,
    model.weights.h5           "ckpt-<sequence>-step-<step>": the sequence orders checkpoints
    optimizer.npz              here as it does locally (a rollback's checkpoint is the newest)
    state.json
    data_iterator.*, ...       the extra files `state.json` lists (a streamed run's data
                               position: `keras_glam.data.streaming.DataIterator.save`)
    manifest.json              size and SHA-256 of every other file; the commit's last file
```

The newest `keep` checkpoint folders stay in the tree; older ones leave it in the same commit and
remain in the history (`from_preset(..., revision=commit)`).

Integrity. A Hub commit is atomic, so a push lands whole or not at all; a checkpoint folder can
still be incomplete when another tool wrote it (`upload_large_folder` spreads files over several
commits), when it was edited by hand, or when it was damaged. Pulling trusts nothing it has not
verified: a folder without manifest, with a file missing, or with a file whose size or SHA-256
differs from the manifest is skipped with a warning, and the next older folder is tried.

Pushes are idempotent: every attempt rebuilds its operations from the remote tree, and the client
skips files whose content the Hub already holds, so a commit that landed but whose answer was lost
is not made twice. One process writes a repository at a time; two runs pushing to the same
repository and branch would interleave their checkpoints.
"""

import collections
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import tempfile
import threading
import time

import huggingface_hub
from huggingface_hub import CommitOperationAdd
from huggingface_hub import CommitOperationDelete
from huggingface_hub import constants
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.errors import RevisionNotFoundError

from keras_glam.hub.auth import parse_hf_handle
from keras_glam.hub.auth import resolve_token
from keras_glam.hub.model_card import render_model_card
from keras_glam.hub.publish import CONFIG_FILE
from keras_glam.hub.publish import KEPT_REMOTE_FILES
from keras_glam.hub.publish import README_FILE
from keras_glam.hub.publish import refuse_leaked_token
from keras_glam.hub.publish import validate_preset_dir
from keras_glam.hub.retry import HubUnavailableError
from keras_glam.hub.retry import call_with_retries
from keras_glam.hub.retry import redact
from keras_glam.models.parameter_count import count_params
from keras_glam.training.checkpointing import CHECKPOINT_FILES
from keras_glam.training.checkpointing import PLAIN_FILE_NAME
from keras_glam.training.checkpointing import STATE_FILE
from keras_glam.training.checkpointing import CheckpointManager
from keras_glam.training.checkpointing import CorruptCheckpointError
from keras_glam.training.checkpointing import listed_files
from keras_glam.training.checkpointing import parse_checkpoint_name
from keras_glam.utils.atomic_files import file_sha256
from keras_glam.utils.checks import check_positive_integers

logger = logging.getLogger(__name__)

CHECKPOINTS_FOLDER = "checkpoints"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "keras_glam.hub_checkpoint.v1"
_CHECKPOINT_DESCRIPTION = (
    "A training checkpoint of a GLaM (Du et al., 2021) mixture-of-experts language model, pushed "
    "by keras_glam's `HubCheckpoint` while training. The repository root is a Keras preset with "
    "the newest weights; `checkpoints/` holds the training state (weights, optimizer state, step, "
    "data position) to resume from, and the commit history holds one commit per checkpoint."
)


class RemoteCheckpointError(RuntimeError):
    """A repository holds checkpoints, but none of them is complete (or none may be used)."""


class _IncompleteCheckpoint(Exception):
    """A remote checkpoint folder failed verification; the message says why."""


@dataclasses.dataclass(frozen=True)
class RemoteCheckpoint:
    """A checkpoint folder in a repository's tree.

    Attributes:
        name: the folder's name, "ckpt-<sequence>-step-<step>".
        sequence: its position in write order (larger is newer).
        step: the training step it holds.
        files: repository paths of the files in the folder.
    """

    name: str
    sequence: int
    step: int
    files: tuple


@dataclasses.dataclass(frozen=True)
class PushedCheckpoint:
    """A checkpoint the Hub confirmed.

    Attributes:
        step: the training step it holds.
        sequence: its position in write order.
        commit_id: the commit holding it.
        commit_url: the commit's web address.
    """

    step: int
    sequence: int
    commit_id: str
    commit_url: str


@dataclasses.dataclass(frozen=True)
class PushJob:
    """A checkpoint to push, with a preset saved from the same weights.

    Attributes:
        checkpoint: the local `Checkpoint`.
        preset_dir: a directory written by `save_to_preset` for this checkpoint; the pusher
            removes it when the job ends.
        release: called (with no argument) once the local checkpoint may be pruned: after the
            Hub confirmed the push, or when a newer checkpoint superseded it.
    """

    checkpoint: object
    preset_dir: str
    release: object


def training_metrics(state, step):
    """The training loss (and cross-entropy) a checkpoint's state records for `step`.

    A `Trainer` state logs one entry per chunk in `chunk_logs`; a state written by
    `HubCheckpoint` during plain `fit` holds `loss` itself.

    Args:
        state: the checkpoint's state dict (`CheckpointManager.verify`).
        step: the checkpoint's step.

    Returns:
        `{"training loss": float, "training cross-entropy": float}`, with the entries found.

    Example:
    ```python
    training_metrics({"chunk_logs": [{"step": 100, "loss": 3.2}]}, 100)
    # {"training loss": 3.2}
    ```
    """
    chunks = [chunk for chunk in state.get("chunk_logs") or [] if chunk.get("step") == step]
    logs = chunks[-1] if chunks else state
    labels = (("loss", "training loss"), ("cross_entropy", "training cross-entropy"))
    return {
        label: float(logs[key])
        for key, label in labels
        if isinstance(logs.get(key), (int, float)) and not isinstance(logs.get(key), bool)
    }


def _manifest(checkpoint, file_names):
    """The manifest of a checkpoint folder: deterministic bytes (a retried commit is a no-op)."""
    files = {}
    for name in file_names:
        path = os.path.join(checkpoint.path, name)
        files[name] = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
    record = {
        "format": MANIFEST_FORMAT,
        "name": os.path.basename(checkpoint.path),
        "sequence": checkpoint.sequence,
        "step": checkpoint.step,
        "files": files,
    }
    return json.dumps(record, indent=2, sort_keys=True).encode()


def _read_manifest(path, remote):
    try:
        with open(path, encoding="utf-8") as file:
            record = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _IncompleteCheckpoint(f"its {MANIFEST_FILE} is not valid JSON ({error})") from None
    if not isinstance(record, dict) or record.get("format") != MANIFEST_FORMAT:
        raise _IncompleteCheckpoint(f"its {MANIFEST_FILE} is not a {MANIFEST_FORMAT} manifest")
    if (record.get("name"), record.get("sequence"), record.get("step")) != (
        remote.name,
        remote.sequence,
        remote.step,
    ):
        raise _IncompleteCheckpoint(
            f"its {MANIFEST_FILE} describes checkpoint {record.get('name')!r}, not this folder"
        )
    files = record.get("files")
    if not isinstance(files, dict):
        raise _IncompleteCheckpoint(f"its {MANIFEST_FILE} lists no files")
    for name in (STATE_FILE, *CHECKPOINT_FILES):
        if name not in files:
            raise _IncompleteCheckpoint(f"its {MANIFEST_FILE} does not list {name}")
    for name, expected in files.items():
        if (
            not PLAIN_FILE_NAME.fullmatch(name)
            or not isinstance(expected, dict)
            or not isinstance(expected.get("bytes"), int)
            or not isinstance(expected.get("sha256"), str)
        ):
            raise _IncompleteCheckpoint(f"its {MANIFEST_FILE} has a malformed entry {name!r}")
    return files


def _checkpoint_folders(repository_files):
    """The checkpoint folders among a repository's file paths, newest (by sequence) first."""
    folders = collections.defaultdict(list)
    for path in repository_files:
        parts = path.split("/")
        if len(parts) == 3 and parts[0] == CHECKPOINTS_FOLDER:
            folders[parts[1]].append(path)
    found = []
    for name, paths in folders.items():
        parsed = parse_checkpoint_name(name)
        if parsed is not None:
            found.append(RemoteCheckpoint(name, *parsed, tuple(sorted(paths))))
    return sorted(found, key=lambda remote: remote.sequence, reverse=True)


def _read_state(checkpoint):
    with open(os.path.join(checkpoint.path, STATE_FILE), encoding="utf-8") as file:
        return json.load(file)["state"]


def _commit_message(step, metrics):
    if "training loss" in metrics:
        return f"Checkpoint at step {step}: loss {metrics['training loss']:.4f}"
    return f"Checkpoint at step {step} (no training loss recorded)"


class CheckpointRepository:
    """A Hub repository of training checkpoints: list, pull and push them (module docstring).

    Every request is retried with exponential backoff on connection errors, HTTP 408, 429 and
    5xx (waiting at least as long as a `Retry-After` asks), never on other 4xx.

    Args:
        repo_id: "namespace/name".
        endpoint: the Hub endpoint.
        token: the Hub token, or None (anonymous: reading public repositories only).
        branch: the branch checkpoints are committed to and read from.
        private: visibility of the repository if a push creates it.
        keep: checkpoint folders kept in the tree, >= 1 (the newest ones).
        card_options: more arguments of `render_model_card` (`training_data`, `description`,
            `license`).
        max_retries: retries per request on transient failures.
        initial_retry_delay: seconds before the first retry; doubles after each.
        max_retry_delay: cap on one wait between retries, in seconds.

    Example:
    ```python
    repository = CheckpointRepository(
        "glam-org/run", endpoint="https://huggingface.co", token=resolve_token())
    commit_id, remote = repository.checkpoints()
    checkpoint = repository.pull(CheckpointManager("run/checkpoints"), remote, commit_id)
    ```
    """

    def __init__(
        self,
        repo_id,
        *,
        endpoint,
        token,
        branch="main",
        private=True,
        keep=2,
        card_options=None,
        max_retries=4,
        initial_retry_delay=1.0,
        max_retry_delay=30.0,
    ):
        check_positive_integers(keep=keep)
        self.repo_id = repo_id
        self.endpoint = endpoint
        self.branch = branch
        self.private = private
        self.keep = keep
        self.card_options = dict(card_options or {})
        self.max_retries = max_retries
        self.initial_retry_delay = initial_retry_delay
        self.max_retry_delay = max_retry_delay
        self._token = token
        self._api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
        self._repository_ready = False

    @property
    def handle(self):
        return f"hf://{self.repo_id}"

    def redacted(self, error):
        """The text of `error` (or any object) without this repository's token, for logs: a
        server or proxy may echo request headers into an error message."""
        return redact(str(error), (self._token,))

    def _retried(self, description, operation, sleep=time.sleep):
        return call_with_retries(
            operation,
            description=f"{description} {self.repo_id}",
            endpoint=self.endpoint,
            max_retries=self.max_retries,
            initial_delay=self.initial_retry_delay,
            max_delay=self.max_retry_delay,
            secrets=(self._token,),
            sleep=sleep,
        )

    def checkpoints(self):
        """`(commit_id, [RemoteCheckpoint])` at the head of the branch, newest first.

        `(None, [])` when the repository or the branch does not exist yet.
        """
        try:
            commit_id = self._retried(
                "repo_info", lambda: self._api.repo_info(self.repo_id, revision=self.branch).sha
            )
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return None, []
        files = self._retried(
            "list_repo_files", lambda: self._api.list_repo_files(self.repo_id, revision=commit_id)
        )
        return commit_id, _checkpoint_folders(files)

    def pull(self, manager, candidates, commit_id):
        """Download the first complete checkpoint of `candidates` into `manager`'s directory.

        Each candidate is verified against its manifest (and then by `CheckpointManager.adopt`);
        an incomplete one is skipped with a warning naming the problem, and the next is tried.

        Args:
            manager: the `CheckpointManager` to install the checkpoint with.
            candidates: `RemoteCheckpoint`s, in the order to try (newest first).
            commit_id: the commit they were listed at (every file is read from it).

        Returns:
            The installed `Checkpoint`, or None when every candidate was incomplete.
        """
        for remote in candidates:
            try:
                checkpoint = self._download(manager, remote, commit_id)
            except _IncompleteCheckpoint as reason:
                logger.warning(
                    "Skipping checkpoint %s of %s (commit %s): %s. Falling back to the previous "
                    "checkpoint.",
                    remote.name,
                    self.handle,
                    commit_id,
                    reason,
                )
                continue
            logger.info(
                "Downloaded checkpoint %s (step %d) of %s into %s.",
                remote.name,
                remote.step,
                self.handle,
                checkpoint.path,
            )
            return checkpoint
        return None

    def _download(self, manager, remote, commit_id):
        folder = f"{CHECKPOINTS_FOLDER}/{remote.name}"
        if f"{folder}/{MANIFEST_FILE}" not in remote.files:
            raise _IncompleteCheckpoint(
                f"it has no {MANIFEST_FILE} (written last), so its upload did not finish"
            )
        with tempfile.TemporaryDirectory(prefix="glam-hub-pull-") as scratch:
            manifest_path = self._download_file(
                f"{folder}/{MANIFEST_FILE}", commit_id, os.path.join(scratch, "manifest")
            )
            expected_files = _read_manifest(manifest_path, remote)
            files_root = os.path.join(scratch, "files")
            for name, expected in sorted(expected_files.items()):
                if f"{folder}/{name}" not in remote.files:
                    raise _IncompleteCheckpoint(f"{name} is missing")
                path = self._download_file(f"{folder}/{name}", commit_id, files_root)
                size = os.path.getsize(path)
                if size != expected["bytes"]:
                    raise _IncompleteCheckpoint(
                        f"{name} has {size} bytes, its manifest says {expected['bytes']}"
                    )
                if file_sha256(path) != expected["sha256"]:
                    raise _IncompleteCheckpoint(f"{name} does not match its manifest's SHA-256")
            try:
                return manager.adopt(os.path.join(files_root, folder), remote.name)
            except CorruptCheckpointError as error:
                raise _IncompleteCheckpoint(str(error)) from None

    def _download_file(self, path, commit_id, local_dir):
        try:
            return self._retried(
                f"download {path} of",
                lambda: self._api.hf_hub_download(
                    self.repo_id, path, revision=commit_id, local_dir=local_dir
                ),
            )
        except EntryNotFoundError:
            raise _IncompleteCheckpoint(f"{path} is listed but cannot be downloaded") from None

    def push(self, checkpoint, preset_dir, *, sleep=time.sleep):
        """Commit `checkpoint` and the preset in `preset_dir` to the branch as one commit.

        The commit holds the preset at the root with our card, the checkpoint folder with its
        manifest last, and deletes the remote files it replaces: root files the preset no longer
        has and checkpoint folders beyond the `keep` newest older than this one (newer ones
        belong to a run this one did not resume from).

        Args:
            checkpoint: the local `Checkpoint`.
            preset_dir: a directory written by `save_to_preset` from the checkpoint's weights.
            sleep: the waiting function between retries (the pusher's can be interrupted).

        Returns:
            A `PushedCheckpoint`.

        Raises:
            HubUnavailableError: the Hub failed transiently beyond the retry budget.
            PresetValidationError, ValueError, HfHubHTTPError: permanent problems.
        """
        name = os.path.basename(checkpoint.path)
        metrics = training_metrics(_read_state(checkpoint), checkpoint.step)
        preset_files = [path for path in validate_preset_dir(preset_dir) if path != README_FILE]
        card = self._card(preset_dir, checkpoint, metrics)
        # The files its record lists (extra files too, such as the data stream's position),
        # not whatever else the directory holds.
        checkpoint_files = listed_files(checkpoint)
        manifest = _manifest(checkpoint, checkpoint_files)
        if self._token is not None:
            refuse_leaked_token(pathlib.Path(preset_dir), preset_files, card, self._token)
            refuse_leaked_token(
                pathlib.Path(checkpoint.path), checkpoint_files, manifest.decode(), self._token
            )
        folder = f"{CHECKPOINTS_FOLDER}/{name}"
        new_paths = {
            *preset_files,
            README_FILE,
            *(f"{folder}/{file_name}" for file_name in checkpoint_files),
            f"{folder}/{MANIFEST_FILE}",
        }
        if not self._repository_ready:
            self._retried(
                "create_repo",
                lambda: self._api.create_repo(self.repo_id, private=self.private, exist_ok=True),
                sleep,
            )
            if self.branch != "main":
                self._retried(
                    "create_branch",
                    lambda: self._api.create_branch(
                        self.repo_id, branch=self.branch, exist_ok=True
                    ),
                    sleep,
                )
            self._repository_ready = True

        def commit():
            # Rebuilt on every attempt: a lost answer may hide a commit that landed.
            remote_files = self._api.list_repo_files(self.repo_id, revision=self.branch)
            older = [
                remote
                for remote in _checkpoint_folders(remote_files)
                if remote.sequence < checkpoint.sequence
            ]
            kept_folders = tuple(f"{CHECKPOINTS_FOLDER}/{r.name}/" for r in older[: self.keep - 1])
            stale = sorted(
                path
                for path in remote_files
                if path not in new_paths
                and path not in KEPT_REMOTE_FILES
                and not path.startswith(kept_folders)
            )
            operations = [CommitOperationDelete(path_in_repo=path) for path in stale]
            operations += [
                CommitOperationAdd(
                    path_in_repo=path, path_or_fileobj=os.path.join(preset_dir, path)
                )
                for path in preset_files
            ]
            operations.append(
                CommitOperationAdd(path_in_repo=README_FILE, path_or_fileobj=card.encode())
            )
            operations += [
                CommitOperationAdd(
                    path_in_repo=f"{folder}/{file_name}",
                    path_or_fileobj=os.path.join(checkpoint.path, file_name),
                )
                for file_name in checkpoint_files
            ]
            # Last: a folder holding its manifest holds everything the manifest lists.
            operations.append(
                CommitOperationAdd(
                    path_in_repo=f"{folder}/{MANIFEST_FILE}", path_or_fileobj=manifest
                )
            )
            return self._api.create_commit(
                self.repo_id,
                operations=operations,
                commit_message=_commit_message(checkpoint.step, metrics),
                commit_description=(
                    f"Training state in `{folder}/` (checkpoint sequence {checkpoint.sequence})."
                ),
                revision=self.branch,
            )

        info = self._retried("create_commit", commit, sleep)
        return PushedCheckpoint(checkpoint.step, checkpoint.sequence, info.oid, info.commit_url)

    def _card(self, preset_dir, checkpoint, metrics):
        with open(os.path.join(preset_dir, CONFIG_FILE), encoding="utf-8") as file:
            backbone_config = json.load(file)["config"]
        total, activated = count_params(backbone_config)
        options = {"description": _CHECKPOINT_DESCRIPTION, **self.card_options}
        return render_model_card(
            self.handle,
            backbone_config=backbone_config,
            total_params=total,
            activated_params=activated,
            training_steps=checkpoint.step,
            metrics=metrics,
            **options,
        )


class _StopRequested(Exception):
    """The pusher was asked to stop while it waited between retries."""


class CheckpointPusher:
    """Pushes checkpoints to a `CheckpointRepository` from a background thread, in order.

    `submit` returns at once. A push that fails transiently is retried with backoff; when its
    retry budget is spent the pusher waits `retry_pause` seconds and starts over, for as long as
    it takes, while training goes on. A permanent failure (an HTTP 4xx such as a revoked token, an
    invalid preset) ends all pushing: `error` holds it and the local checkpoint is kept. At most
    `max_waiting` checkpoints wait behind the one in flight; when another arrives the oldest
    waiting one is superseded (dropped unpushed: the newer one holds everything needed to resume),
    which bounds the disk that checkpoints held for the Hub take.

    Args:
        repository: the `CheckpointRepository`.
        max_waiting: int >= 0, checkpoints that may wait behind the one in flight.
        retry_pause: seconds between two rounds of retries.

    Attributes:
        pushed: `PushedCheckpoint`s the Hub confirmed, in order.
        superseded: `Checkpoint`s dropped unpushed for a newer one.
        error: the permanent failure that ended pushing, or None.

    Example:
    ```python
    pusher = CheckpointPusher(repository)
    manager.hold(checkpoint)
    pusher.submit(PushJob(checkpoint, preset_dir, lambda: manager.release(checkpoint)))
    pusher.flush(timeout=600)
    ```
    """

    def __init__(self, repository, *, max_waiting=2, retry_pause=30.0):
        if not (isinstance(max_waiting, int) and max_waiting >= 0):
            raise ValueError(f"`max_waiting` must be an integer >= 0. Received: {max_waiting!r}")
        self.repository = repository
        self.max_waiting = max_waiting
        self.retry_pause = retry_pause
        self.pushed = []
        self.superseded = []
        self.error = None
        self._condition = threading.Condition()
        self._waiting = collections.deque()
        self._in_flight = None
        self._worker = None
        self._stop_requested = False

    @property
    def unpushed(self):
        """Checkpoints submitted and not pushed yet (in flight first), oldest first."""
        with self._condition:
            jobs = ([self._in_flight] if self._in_flight else []) + list(self._waiting)
        return [job.checkpoint for job in jobs]

    def submit(self, job):
        """Queue `job` behind the others and return at once.

        Returns:
            True; False when pushing ended after a permanent failure (see `error`): the job
            was not queued and the caller keeps its checkpoint and preset directory.
        """
        with self._condition:
            if self.error is not None:
                return False
            self._waiting.append(job)
            superseded = []
            while len(self._waiting) > self.max_waiting + (self._in_flight is None):
                superseded.append(self._waiting.popleft())
            self._run_worker()
        for old in superseded:
            logger.warning(
                "Checkpoint step %d was superseded by step %d before it could be pushed to %s; "
                "only the newer one will be pushed.",
                old.checkpoint.step,
                job.checkpoint.step,
                self.repository.handle,
            )
            self.superseded.append(old.checkpoint)
            self._settle(old, release=True)
        return True

    def flush(self, timeout=None):
        """Wait until every submitted checkpoint is pushed, pushing ended, or `timeout` seconds.

        Returns:
            True when nothing is left to push.
        """
        with self._condition:
            if self.error is None and not self._idle():
                self._run_worker()
            self._condition.wait_for(
                lambda: self._idle() or self.error is not None, timeout=timeout
            )
            return self._idle()

    def stop(self):
        """Ask the worker to end: now if it is waiting, else after the request in progress.

        Unpushed checkpoints stay queued; the next `submit` or `flush` resumes them.
        """
        with self._condition:
            self._stop_requested = True
            self._condition.notify_all()

    def _run_worker(self):
        """Start the worker unless it runs, and cancel a stop request (lock held)."""
        self._stop_requested = False
        if self._worker is None:
            self._worker = threading.Thread(
                target=self._work, name="glam-hub-checkpoint-pusher", daemon=True
            )
            self._worker.start()
        self._condition.notify_all()

    def _idle(self):
        return not self._waiting and self._in_flight is None

    def _pause(self, seconds):
        with self._condition:
            if self._condition.wait_for(lambda: self._stop_requested, timeout=seconds):
                raise _StopRequested()

    def _work(self):
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._waiting or self._stop_requested)
                if self._stop_requested:
                    self._worker = None
                    self._condition.notify_all()
                    return
                job = self._in_flight = self._waiting.popleft()
            try:
                pushed = self._push_until_confirmed(job)
            except _StopRequested:
                with self._condition:
                    self._waiting.appendleft(job)
                    self._in_flight = None
                    self._condition.notify_all()
                continue  # Ends the thread unless a `submit` or `flush` cancelled the stop.
            except Exception as error:  # Permanent: retrying cannot help.
                logger.error(
                    "Pushing checkpoint step %d to %s failed permanently: %s. No further "
                    "checkpoint will be pushed; the local copy %s is kept.",
                    job.checkpoint.step,
                    self.repository.handle,
                    self.repository.redacted(error),
                    job.checkpoint.path,
                )
                with self._condition:
                    self.error = error
                    # Never pushed now, but kept locally: reported as unpushed.
                    self._waiting.appendleft(job)
                    abandoned = list(self._waiting)
                    self._in_flight = None
                    self._worker = None
                    self._condition.notify_all()
                for unpushed in abandoned:
                    self._settle(unpushed, release=False)
                return
            logger.info(
                "Pushed checkpoint step %d to %s: %s",
                pushed.step,
                self.repository.handle,
                pushed.commit_url,
            )
            self._settle(job, release=True)
            with self._condition:
                self.pushed.append(pushed)
                self._in_flight = None
                self._condition.notify_all()

    def _push_until_confirmed(self, job):
        while True:
            try:
                return self.repository.push(job.checkpoint, job.preset_dir, sleep=self._pause)
            except HubUnavailableError as error:
                logger.warning(
                    "Pushing checkpoint step %d to %s keeps failing (%s). Training goes on; "
                    "trying again in %.3g s.",
                    job.checkpoint.step,
                    self.repository.handle,
                    self.repository.redacted(error),
                    self.retry_pause,
                )
                self._pause(self.retry_pause)

    @staticmethod
    def _settle(job, *, release):
        shutil.rmtree(job.preset_dir, ignore_errors=True)
        if release:
            job.release()


def pull_latest_checkpoint(
    handle,
    checkpoint_dir,
    *,
    revision=None,
    token=None,
    max_retries=4,
    initial_retry_delay=1.0,
):
    """Download the newest complete checkpoint of a Hub repository into a checkpoint directory.

    For resuming outside a `Trainer` (which `HubCheckpoint` serves by itself): the checkpoint
    lands in `checkpoint_dir` under its own name, ready for `CheckpointManager.restore`.
    Incomplete checkpoints are skipped with a warning, for the next older one.

    Args:
        handle: "hf://namespace/name".
        checkpoint_dir: a `CheckpointManager` directory (created if needed).
        revision: the branch (or commit) to read; None is `main`.
        token: the Hub token (needed for private repositories); None uses the Hub client's own
            (`HF_TOKEN`, `hf auth login`, ...: see `resolve_token`).
        max_retries: retries per request on transient failures.
        initial_retry_delay: seconds before the first retry; doubles after each.

    Returns:
        The installed `Checkpoint`, or None when the repository holds no checkpoint.

    Raises:
        RemoteCheckpointError: the repository holds checkpoints but none is complete.
        HubUnavailableError: the Hub could not be reached within the retry budget.

    Example:
    ```python
    manager = CheckpointManager("run/checkpoints")
    checkpoint = pull_latest_checkpoint("hf://glam-org/run", manager.directory)
    state = manager.restore(checkpoint, causal_lm)
    ```
    """
    namespace, name = parse_hf_handle(handle)
    if namespace is None:
        raise ValueError(f"Pass the full handle 'hf://namespace/{name}', got {handle!r}.")
    repository = CheckpointRepository(
        f"{namespace}/{name}",
        endpoint=constants.ENDPOINT,
        token=resolve_token(token),
        branch=revision or "main",
        max_retries=max_retries,
        initial_retry_delay=initial_retry_delay,
    )
    manager = CheckpointManager(checkpoint_dir)
    commit_id, remote = repository.checkpoints()
    if not remote:
        return None
    checkpoint = repository.pull(manager, remote, commit_id)
    if checkpoint is None:
        raise incomplete_repository_error(repository.handle, remote)
    return checkpoint


def incomplete_repository_error(handle, remote):
    """The `RemoteCheckpointError` for a repository none of whose checkpoints is complete."""
    names = ", ".join(checkpoint.name for checkpoint in remote)
    return RemoteCheckpointError(
        f"{handle} holds checkpoints ({names}) but none is complete (see the warnings above). "
        f"Delete the '{CHECKPOINTS_FOLDER}/' folder of the repository, or push to another "
        "repository."
    )
