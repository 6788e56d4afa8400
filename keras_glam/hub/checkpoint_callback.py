"""`HubCheckpoint`: a Keras callback that pushes training checkpoints to the Hugging Face Hub.

Public as `keras_glam.callbacks.HubCheckpoint`; the repository layout, pushing and pulling back
are `keras_glam.hub.checkpoint_sync`.
"""

import functools
import logging
import os
import shutil
import tempfile

from keras_glam.hub.auth import check_write_access
from keras_glam.hub.auth import resolve_token
from keras_glam.hub.checkpoint_sync import CheckpointPusher
from keras_glam.hub.checkpoint_sync import CheckpointRepository
from keras_glam.hub.checkpoint_sync import PushJob
from keras_glam.hub.checkpoint_sync import incomplete_repository_error
from keras_glam.hub.model_card import read_eval_results
from keras_glam.hub.publish import check_branch_revision
from keras_glam.training.callbacks import CheckpointObserver
from keras_glam.training.checkpointing import CheckpointManager

logger = logging.getLogger(__name__)


class HubCheckpoint(CheckpointObserver):
    """Pushes training checkpoints to a Hugging Face Hub repository in the background.

    Every pushed checkpoint is one commit ("Checkpoint at step 600: loss 2.3412") holding a
    complete Keras preset with the checkpoint's weights and keras_glam's model card at the root,
    so `GLaMCausalLM.from_preset("hf://org/run")` loads the newest weights, and the training state
    (weights, optimizer state, step, data position, seeds) in `checkpoints/<name>/` with a
    manifest of sizes and SHA-256 sums, its last file. See `keras_glam.hub.checkpoint_sync` for
    the layout.

    With a `keras_glam.training.trainer.Trainer` (the intended use) the Trainer's own checkpoints
    are pushed, and a run started with the same handle on a fresh machine (empty checkpoint
    directory) first downloads the newest complete checkpoint of the repository and continues
    from it exactly. With plain `model.fit`, pass `checkpoint_dir` and `every_n_steps`: the
    callback then writes the checkpoints itself (state: step and loss; resuming is up to the
    caller, with `keras_glam.hub.pull_latest_checkpoint`).

    Guarantees:
    - The token is checked when the callback is built, before any training step: a missing token
      or one without write access raises `HubAuthError`. The token is never logged and never
      written into a card or a checkpoint.
    - The training loop waits for the local saves only (the checkpoint, and a preset written
      from the same weights); uploads run in a worker thread.
    - A failed push (HTTP 5xx, 408 or 429, a dropped connection, the Hub down) is retried with
      exponential backoff (at least as long as a `Retry-After` asks), then again every
      `max_retry_delay` seconds, while training goes on.
      A commit that landed but whose answer was lost is not repeated.
    - A checkpoint is kept in the local directory until the Hub confirms its push (the
      `CheckpointManager` does not prune it), unless a newer checkpoint supersedes it while it
      waits (at most `max_waiting_pushes` wait behind the one in flight).
    - When training ends (`Trainer.fit` returns or raises; plain `fit`'s `on_train_end`), the
      callback pushes the newest checkpoint if it was not pushed yet, waits up to `flush_timeout`
      seconds for the pushes, and logs what is still unpushed (`unpushed`). Unpushed checkpoints
      stay in the local directory; resuming from that directory pushes the newest one.
    - Pulling verifies every file against the manifest; an incomplete checkpoint is skipped with
      a warning for the next older one.

    Args:
        handle: "hf://namespace/name", or "hf://name" for the token's own namespace.
        every_n_steps: push a checkpoint once at least this many steps passed since the last
            pushed one. With a `Trainer`, None pushes every checkpoint it writes (every
            `checkpoint_interval` steps); a value should be a multiple of it. Required with
            plain `fit`, where the callback writes a checkpoint every `every_n_steps` steps.
        checkpoint_dir: plain `fit` only: the directory of the checkpoints this callback writes.
            With a `Trainer`, leave it None: the Trainer's `checkpoint_dir` is used.
        max_checkpoints: plain `fit` only: local checkpoints kept (unpushed ones on top).
        revision: the branch to push to and resume from (created from `main` if missing);
            None is `main`.
        private: visibility of the repository if this callback creates it (an existing one
            keeps its visibility).
        keep_remote_checkpoints: checkpoint folders kept in the repository's tree (the newest;
            older ones stay in the history).
        max_waiting_pushes: checkpoints that may wait behind the push in flight before the
            oldest waiting one is superseded.
        flush_timeout: seconds to wait for the pushes when training ends.
        training_data: what the model is trained on, for the model card.
        description: the model card's introduction; a default describes a training checkpoint.
        license: the licence identifier for the model card.
        eval_results: the `results.json` of `glam-eval` (a path or its parsed dict); its scores
            go into every pushed card's `model-index` and "Evaluation" table. Read when the
            callback is built, so a bad file fails before training.
        max_retries: retries per request on transient failures before a pause.
        initial_retry_delay: seconds before the first retry; doubles after each.
        max_retry_delay: cap on the wait between retries, and the pause between two rounds.
        token: the Hub token; None uses the Hub client's own (`HF_TOKEN`, `hf auth login`, ...:
            see `keras_glam.hub.resolve_token`).

    Attributes:
        handle: "hf://namespace/name" of the resolved repository.

    Example:
    ```python
    hub_checkpoint = HubCheckpoint("hf://glam-org/glam-run")
    trainer = Trainer(lm, make_dataset, total_steps=600, checkpoint_dir="run/checkpoints",
                      checkpoint_interval=50, callbacks=[hub_checkpoint])
    trainer.fit()  # resumes from hf://glam-org/glam-run if it holds a newer checkpoint
    hub_checkpoint.pushed[-1].commit_url
    ```
    """

    def __init__(
        self,
        handle,
        every_n_steps=None,
        *,
        checkpoint_dir=None,
        max_checkpoints=3,
        revision=None,
        private=True,
        keep_remote_checkpoints=2,
        max_waiting_pushes=2,
        flush_timeout=600.0,
        training_data=None,
        description=None,
        license="apache-2.0",  # noqa: A002 - the model-card field's name
        eval_results=None,
        max_retries=4,
        initial_retry_delay=1.0,
        max_retry_delay=30.0,
        token=None,
    ):
        super().__init__()
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(
                f"`every_n_steps` must be None or an integer >= 1. Received: {every_n_steps!r}"
            )
        if checkpoint_dir is not None and every_n_steps is None:
            raise ValueError(
                "With `checkpoint_dir` (plain `model.fit`) the callback writes the checkpoints "
                "itself: pass `every_n_steps` too."
            )
        if not flush_timeout >= 0:
            raise ValueError(f"`flush_timeout` must be >= 0 seconds. Received: {flush_timeout!r}")
        check_branch_revision(revision)
        if eval_results is not None:
            eval_results = read_eval_results(eval_results)
        token = resolve_token(token)
        access = check_write_access(
            handle, token=token, max_retries=max_retries, initial_retry_delay=initial_retry_delay
        )
        self.handle = f"hf://{access.repo_id}"
        self.every_n_steps = every_n_steps
        self.checkpoint_dir = checkpoint_dir
        self.max_checkpoints = max_checkpoints
        self.flush_timeout = flush_timeout
        self._repository = CheckpointRepository(
            access.repo_id,
            endpoint=access.endpoint,
            token=token,
            branch=revision or "main",
            private=private,
            keep=keep_remote_checkpoints,
            card_options={
                "training_data": training_data,
                "description": description,
                "license": license,
                "eval_results": eval_results,
            },
            max_retries=max_retries,
            initial_retry_delay=initial_retry_delay,
            max_retry_delay=max_retry_delay,
        )
        self._pusher = CheckpointPusher(
            self._repository, max_waiting=max_waiting_pushes, retry_pause=max_retry_delay
        )
        self._manager = None
        self._writes_checkpoints = False  # plain `fit`: this callback saves the checkpoints
        self._preprocessor = None
        self._training_started = False
        self._model_changed = False  # a training step ran since the newest checkpoint
        self._last_submitted_step = 0
        self._newest_unsubmitted = None
        self._restored_to_push = None
        self._step = 0
        self._loss = None

    @property
    def pushed(self):
        """`PushedCheckpoint`s the Hub confirmed, in push order."""
        return list(self._pusher.pushed)

    @property
    def superseded(self):
        """Local `Checkpoint`s dropped unpushed: a newer one replaced them while they waited."""
        return list(self._pusher.superseded)

    @property
    def unpushed(self):
        """Local `Checkpoint`s handed to the pusher and not pushed yet, oldest first."""
        return self._pusher.unpushed

    def wait(self, timeout=None):
        """Wait until every checkpoint handed over is pushed (or `timeout` seconds); True if so."""
        return self._pusher.flush(timeout)

    # --------------------------------------------------------------------------------------
    # Hooks of the Trainer.

    def prepare_checkpoints(self, model, manager, *, resume):
        """Called by the `Trainer` before it looks for a checkpoint to resume from.

        With `resume`, downloads the repository's newest complete checkpoint into `manager`'s
        directory when it is newer than the newest local one (the Trainer then restores it);
        a local checkpoint newer than the repository's is pushed before the first step. Without
        `resume`, refuses a repository that already holds checkpoints.

        Raises:
            FileExistsError: `resume=False` and the repository holds checkpoints.
            RemoteCheckpointError: the repository holds checkpoints, none complete, and there
                is no local one.
        """
        if self.checkpoint_dir is not None:
            raise ValueError(
                f"HubCheckpoint(checkpoint_dir={self.checkpoint_dir!r}) is for plain "
                "`model.fit`; with a Trainer, the Trainer's checkpoint_dir is used. Drop "
                "`checkpoint_dir`."
            )
        self._attach(model, manager)
        commit_id, remote = self._repository.checkpoints()
        if remote and not resume:
            raise FileExistsError(
                f"{self.handle} already holds checkpoints of an earlier run (newest: step "
                f"{remote[0].step}); they are kept. Resume from them (`resume=True`), or push "
                "to another repository."
            )
        local = manager.latest() if resume else None
        newer = [r for r in remote if local is None or r.sequence > local.sequence]
        start = local
        if newer:
            start = self._repository.pull(manager, newer, commit_id) or local
            if start is None:
                raise incomplete_repository_error(self.handle, remote)
        elif local is not None and os.path.basename(local.path) not in {r.name for r in remote}:
            # Written by a run that ended before pushing it; the Trainer restores it next.
            self._restored_to_push = local
        self._last_submitted_step = start.step if start is not None else 0

    def on_training_finished(self):
        """Called by the `Trainer` when its run ends: push the newest checkpoint, then flush."""
        if self._newest_unsubmitted is not None and not self._model_changed:
            self._submit(self._newest_unsubmitted)
        self._flush_and_report()

    def on_checkpoint_saved(self, checkpoint):
        """Hand `checkpoint` to the pusher when it is due (see `every_n_steps`)."""
        self._model_changed = False
        if not self._training_started:
            return  # A new run's initial weights: nothing worth pushing.
        steps_since = checkpoint.step - self._last_submitted_step
        # A rollback's checkpoint (steps_since <= 0) is a new state of the run: always pushed.
        if self.every_n_steps is None or not 0 < steps_since < self.every_n_steps:
            self._submit(checkpoint)
        else:
            self._newest_unsubmitted = checkpoint

    # --------------------------------------------------------------------------------------
    # Keras hooks.

    def on_train_begin(self, logs=None):
        if self._manager is None:
            self._begin_plain_fit()
        elif self._restored_to_push is not None:
            checkpoint, self._restored_to_push = self._restored_to_push, None
            self._submit(checkpoint)
        self._training_started = True

    def on_train_batch_end(self, batch, logs=None):
        self._model_changed = True
        if not self._writes_checkpoints:
            return
        self._step += 1
        self._loss = (logs or {}).get("loss", self._loss)
        if self._step - self._last_submitted_step >= self.every_n_steps:
            self._save_and_submit()

    def on_train_end(self, logs=None):
        if not self._writes_checkpoints:
            return  # A Trainer calls `on_training_finished` once its run ends.
        if self._model_changed:
            self._save_and_submit()
        self._flush_and_report()

    # --------------------------------------------------------------------------------------

    def _attach(self, model, manager):
        if not (hasattr(model, "save_to_preset") and hasattr(model, "backbone")):
            raise TypeError(
                "HubCheckpoint pushes KerasHub task models (such as GLaMCausalLM), which save "
                f"presets; got {type(model).__name__}."
            )
        self.set_model(model)
        self._manager = manager
        # The Trainer detaches the preprocessor while fitting; the presets must still hold it.
        self._preprocessor = model.preprocessor
        self._training_started = False
        self._model_changed = False
        self._newest_unsubmitted = None
        self._restored_to_push = None

    def _begin_plain_fit(self):
        if self.checkpoint_dir is None:
            raise ValueError(
                "With plain `model.fit`, HubCheckpoint writes the checkpoints itself: pass "
                "`checkpoint_dir=` and `every_n_steps=`. (A Trainer passes its own checkpoints.)"
            )
        manager = CheckpointManager(self.checkpoint_dir, self.max_checkpoints)
        _, remote = self._repository.checkpoints()
        local = manager.latest()
        if remote and (local is None or remote[0].sequence > local.sequence):
            raise FileExistsError(
                f"{self.handle} holds newer checkpoints (step {remote[0].step}) than "
                f"{self.checkpoint_dir}. To continue that run, download and restore it first: "
                "`keras_glam.hub.pull_latest_checkpoint(handle, checkpoint_dir)` and "
                "`CheckpointManager(checkpoint_dir).restore(checkpoint, model)`; or push to "
                "another repository."
            )
        model = self.model
        self._attach(model, manager)
        self._writes_checkpoints = True
        self._step = int(model.optimizer.iterations.numpy())
        self._last_submitted_step = self._step

    def _save_and_submit(self):
        state = {"step": self._step}
        if self._loss is not None:
            state["loss"] = float(self._loss)
        checkpoint = self._manager.save(self.model, state)
        self._model_changed = False
        self._submit(checkpoint)

    def _submit(self, checkpoint):
        if self._pusher.error is not None:
            return  # Reported when training ends; the local checkpoints are pruned as usual.
        self._manager.hold(checkpoint)
        release = functools.partial(self._manager.release, checkpoint)
        preset_dir = tempfile.mkdtemp(prefix="glam-hub-preset-")
        try:
            self._save_preset(preset_dir)
            queued = self._pusher.submit(PushJob(checkpoint, preset_dir, release))
        except BaseException:
            shutil.rmtree(preset_dir, ignore_errors=True)
            release()
            raise
        if not queued:
            shutil.rmtree(preset_dir, ignore_errors=True)
            release()
            return
        self._last_submitted_step = checkpoint.step
        self._newest_unsubmitted = None

    def _save_preset(self, directory):
        model = self.model  # With JAX, reading `self.model` syncs the training state first.
        reattach = model.preprocessor is None and self._preprocessor is not None
        if reattach:  # task.json embeds the preprocessor: save with it attached.
            model.preprocessor = self._preprocessor
        try:
            model.save_to_preset(directory)
        finally:
            if reattach:
                model.preprocessor = None

    def _flush_and_report(self):
        complete = self._pusher.flush(self.flush_timeout)
        if not complete:
            self._pusher.stop()
        unpushed = self._pusher.unpushed
        if self._pusher.error is not None:
            logger.error(
                "Pushing to %s ended after a permanent failure (%s). Unpushed checkpoints, "
                "kept locally: %s.",
                self.handle,
                self._repository.redacted(self._pusher.error),
                ", ".join(checkpoint.path for checkpoint in unpushed) or "none",
            )
        elif unpushed:
            logger.warning(
                "%d checkpoint(s) not pushed to %s within %.3g s (steps %s); they are kept in "
                "%s. Resuming from that directory with this callback pushes the newest one.",
                len(unpushed),
                self.handle,
                self.flush_timeout,
                ", ".join(str(checkpoint.step) for checkpoint in unpushed),
                self._manager.directory,
            )
        elif self._pusher.pushed:
            newest = self._pusher.pushed[-1]
            logger.info(
                "All checkpoints pushed to %s; the newest (step %d) is commit %s.",
                self.handle,
                newest.step,
                newest.commit_id,
            )
