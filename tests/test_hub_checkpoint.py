"""Training checkpoints that sync to the Hugging Face Hub: `HubCheckpoint` and `publish_model`.

Every push and pull goes through the real `huggingface_hub` client to `hub_server.HubServer`,
with its faults (HTTP errors, dropped connections, the server down) injected on the wire.
"""

import functools
import hashlib
import json
import logging
import pathlib

import huggingface_hub
import keras
import numpy as np
import pytest
import tensorflow as tf
from hub_server import READ_ONLY_ORG
from hub_server import WRITABLE_ORG
from huggingface_hub import CommitOperationAdd
from huggingface_hub import constants

import keras_glam
from keras_glam.callbacks import HubCheckpoint
from keras_glam.hub import HubAuthError
from keras_glam.hub import RemoteCheckpointError
from keras_glam.hub import publish_model
from keras_glam.hub import pull_latest_checkpoint
from keras_glam.hub.checkpoint_sync import MANIFEST_FILE
from keras_glam.hub.checkpoint_sync import MANIFEST_FORMAT
from keras_glam.hub.checkpoint_sync import CheckpointPusher
from keras_glam.hub.checkpoint_sync import CheckpointRepository
from keras_glam.hub.checkpoint_sync import PushJob
from keras_glam.training.checkpointing import CheckpointManager
from keras_glam.training.checkpointing import parse_checkpoint_name
from keras_glam.training.trainer import Trainer

REPO_ID = f"{WRITABLE_ORG}/glam-run"
HANDLE = f"hf://{REPO_ID}"
BATCH, LENGTH = 2, 8
FAST = {"max_retries": 2, "initial_retry_delay": 0.01, "max_retry_delay": 0.2}
PRESET_FILES = {
    "README.md",
    "config.json",
    "metadata.json",
    "model.weights.h5",
    "preprocessor.json",
    "task.json",
    "tokenizer.json",
    "assets/tokenizer/vocabulary.spm",
}
CHECKPOINT_FILES = {"model.weights.h5", "optimizer.npz", "state.json", "manifest.json"}


def _lm(seed=0, num_experts=None):
    """A 2-layer GLaM with the shipped 4096-piece tokenizer, compiled; dense unless
    `num_experts` (then MoE on layer 0: routing state must survive a resume too)."""
    keras.utils.set_random_seed(seed)
    backbone = keras_glam.GLaMBackbone(
        vocabulary_size=4096,
        num_layers=2,
        hidden_dim=16,
        intermediate_dim=32,
        num_heads=2,
        head_dim=8,
        num_experts=num_experts,
    )
    preprocessor = keras_glam.GLaMCausalLMPreprocessor.from_preset(
        "glam_tiny_8e", sequence_length=LENGTH
    )
    lm = keras_glam.GLaMCausalLM(backbone, preprocessor=preprocessor)
    lm.compile()
    return lm


def _batch(seed, position):
    """Random tokens whose labels are all 1 (a target the model learns within a few steps)."""
    rng = np.random.default_rng([seed, position])
    x = {
        "token_ids": rng.integers(0, 64, size=(BATCH, LENGTH)).astype("int32"),
        "padding_mask": np.ones((BATCH, LENGTH), "int32"),
    }
    return x, np.ones((BATCH, LENGTH), "int32"), np.ones((BATCH, LENGTH), "float32")


def _make_dataset(seed, skip_batches):
    """The Trainer's `make_dataset`: an endless deterministic stream entered at a position."""

    def batches():
        position = skip_batches
        while True:
            yield _batch(seed, position)
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


def _trainer(lm, directory, total_steps, callbacks=(), **kwargs):
    return Trainer(
        lm,
        _make_dataset,
        total_steps,
        directory,
        checkpoint_interval=2,
        callbacks=list(callbacks),
        verbose=0,
        **kwargs,
    )


def _weights(lm):
    return [np.array(variable.numpy()) for variable in lm.weights]


def _logits(lm):
    return np.asarray(lm(_batch(7, 0)[0]))


def _titles(hub_server):
    """Commit titles of the branch, oldest first, without the repository's initial commit."""
    return [commit.title for commit in reversed(hub_server.commits(REPO_ID))][1:]


def _checkpoint_folders(files):
    return sorted({path.split("/")[1] for path in files if path.startswith("checkpoints/")})


@pytest.fixture(scope="module")
def uninterrupted_weights(tmp_path_factory):
    """Weights after 6 steps trained without interruption (no Hub involved)."""
    lm = _lm(num_experts=4)
    _trainer(lm, tmp_path_factory.mktemp("uninterrupted"), 6).fit()
    return _weights(lm)


def test_checkpoints_are_presets_and_a_fresh_machine_resumes_exactly(
    hub_server, tmp_path, caplog, uninterrupted_weights
):
    first = _lm(num_experts=4)
    first_hub = HubCheckpoint(HANDLE, **FAST)
    _trainer(first, tmp_path / "machine_a", 4, [first_hub]).fit()

    # One commit per checkpoint (the run's initial weights are not pushed), step and loss in
    # the message; the root is a preset with the newest weights, the training state below it.
    assert [pushed.step for pushed in first_hub.pushed] == [2, 4] and not first_hub.unpushed
    titles = _titles(hub_server)
    assert [title.split(":")[0] for title in titles] == [
        "Checkpoint at step 2",
        "Checkpoint at step 4",
    ]
    assert all(": loss " in title for title in titles)
    files = hub_server.files(REPO_ID)
    names = ["ckpt-000001-step-000000002", "ckpt-000002-step-000000004"]
    assert _checkpoint_folders(files) == names
    assert set(files) == {
        ".gitattributes",
        *PRESET_FILES,
        *(f"checkpoints/{name}/{file}" for name in names for file in CHECKPOINT_FILES),
    }
    manifest = json.loads(files[f"checkpoints/{names[1]}/manifest.json"])
    assert (manifest["step"], manifest["sequence"]) == (4, 2)
    assert set(manifest["files"]) == CHECKPOINT_FILES - {"manifest.json"}
    card = files["README.md"].decode()
    total, _ = keras_glam.count_params(first.backbone.get_config())
    assert f"| Total | {total:,}" in card and "- Steps: 4" in card and "training loss" in card
    loaded = keras_glam.GLaMCausalLM.from_preset(HANDLE)
    assert isinstance(loaded.preprocessor, keras_glam.GLaMCausalLMPreprocessor)
    np.testing.assert_array_equal(_logits(loaded), _logits(first))

    # Two newer checkpoints that must not be resumed from: an upload that stopped before its
    # manifest, and a folder whose weights differ from its manifest (same size, other bytes).
    newest = {name.split("/")[-1]: files[name] for name in files if names[1] in name}
    damaged = bytearray(newest["model.weights.h5"])
    damaged[len(damaged) // 2] ^= 0xFF
    lying_manifest = {**manifest, "name": "ckpt-000004-step-000000008", "sequence": 4, "step": 8}
    huggingface_hub.HfApi().create_commit(
        REPO_ID,
        operations=[
            CommitOperationAdd("checkpoints/ckpt-000003-step-000000006/state.json", b"{}"),
            CommitOperationAdd(
                "checkpoints/ckpt-000003-step-000000006/model.weights.h5",
                newest["model.weights.h5"],
            ),
            *(
                CommitOperationAdd(f"checkpoints/ckpt-000004-step-000000008/{name}", content)
                for name, content in (
                    ("model.weights.h5", bytes(damaged)),
                    ("optimizer.npz", newest["optimizer.npz"]),
                    ("state.json", newest["state.json"]),
                    ("manifest.json", json.dumps(lying_manifest).encode()),
                )
            ),
        ],
        commit_message="an interrupted upload and a damaged checkpoint",
    )

    # A new machine: an empty checkpoint directory, other initial weights.
    second = _lm(seed=99, num_experts=4)
    second_hub = HubCheckpoint(HANDLE, **FAST)
    with caplog.at_level(logging.WARNING):
        state = _trainer(second, tmp_path / "machine_b", 6, [second_hub]).fit()
    assert "Skipping checkpoint ckpt-000004-step-000000008" in caplog.text
    assert "model.weights.h5 does not match its manifest's SHA-256" in caplog.text
    assert "Skipping checkpoint ckpt-000003-step-000000006" in caplog.text
    assert "no manifest.json" in caplog.text
    assert state.step == 6 and [pushed.step for pushed in second_hub.pushed] == [6]
    for expected, actual in zip(uninterrupted_weights, _weights(second), strict=True):
        np.testing.assert_array_equal(expected, actual)

    # The push replaced the broken folders and kept the newest two checkpoints.
    files = hub_server.files(REPO_ID)
    assert _checkpoint_folders(files) == [names[1], "ckpt-000003-step-000000006"]
    assert json.loads(files["checkpoints/ckpt-000003-step-000000006/manifest.json"])["step"] == 6
    loaded = keras_glam.GLaMCausalLM.from_preset(HANDLE)
    np.testing.assert_array_equal(_logits(loaded), _logits(second))


def _streaming_data(pattern):
    from keras_glam.data.streaming import StreamingData

    tokenizer = keras_glam.GLaMTokenizer.from_preset("glam_tiny_8e")
    return StreamingData.from_specs(
        [pattern], tokenizer, sequence_length=LENGTH, batch_size=BATCH, shuffle_buffer=8
    )


@pytest.mark.slow
def test_a_streamed_run_resumes_from_the_hub_where_its_data_stream_was(hub_server, tmp_path):
    """The data iterator's files travel with the checkpoint (listed in its manifest) and a
    fresh machine continues the stream from them."""
    with open(tmp_path / "corpus.jsonl", "w") as file:
        for index in range(300):
            file.write(json.dumps({"text": f"Document {index} of a streamed corpus."}) + "\n")
    pattern = str(tmp_path / "corpus.jsonl")
    uninterrupted = _lm()
    Trainer(
        uninterrupted, _streaming_data(pattern), 4, tmp_path / "u", checkpoint_interval=2,
        verbose=0,
    ).fit()

    first = _lm()
    hub = HubCheckpoint(HANDLE, **FAST)
    Trainer(
        first, _streaming_data(pattern), 2, tmp_path / "a", checkpoint_interval=2,
        callbacks=[hub], verbose=0,
    ).fit()
    assert [pushed.step for pushed in hub.pushed] == [2]
    files = hub_server.files(REPO_ID)
    folder = "checkpoints/ckpt-000001-step-000000002"
    data_files = {"data_iterator.index", "data_iterator.json", "data_pending.npz"}
    assert {f"{folder}/{name}" for name in data_files} <= set(files)
    manifest = json.loads(files[f"{folder}/manifest.json"])
    assert data_files <= set(manifest["files"])
    saved = json.loads(files[f"{folder}/data_iterator.json"])
    assert saved["position"] == 2

    second = _lm(seed=99)
    state = Trainer(
        second, _streaming_data(pattern), 4, tmp_path / "b", checkpoint_interval=2,
        callbacks=[HubCheckpoint(HANDLE, **FAST)], verbose=0,
    ).fit()
    assert state.step == 4 and state.data_position == 4
    for expected, actual in zip(_weights(uninterrupted), _weights(second), strict=True):
        np.testing.assert_array_equal(expected, actual)


class _HubOutage(keras.callbacks.Callback):
    """Takes the Hub down at the first training step and brings it back when `fit` ends,
    noting what the checkpoint directory held and what was pushed meanwhile. Listed before the
    `HubCheckpoint`, so that the Hub is back before the callback flushes."""

    def __init__(self, hub_server, hub_checkpoint, checkpoint_dir):
        super().__init__()
        self.hub_server = hub_server
        self.hub_checkpoint = hub_checkpoint
        self.checkpoint_dir = checkpoint_dir
        self.local_steps = None
        self.pushed = None

    def on_train_batch_begin(self, batch, logs=None):
        self.hub_server.stop()  # A no-op once it is down.

    def on_train_end(self, logs=None):
        checkpoints = CheckpointManager(self.checkpoint_dir).checkpoints()
        self.local_steps = [checkpoint.step for checkpoint in checkpoints]
        self.pushed = self.hub_checkpoint.pushed
        self.hub_server.start()


def test_pushes_outlast_server_errors_dropped_connections_and_an_outage(
    hub_server, tmp_path, caplog, capfd, monkeypatch
):
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # the client logs curl-like request dumps
    caplog.set_level(logging.DEBUG)
    hub = HubCheckpoint(HANDLE, every_n_steps=4, **FAST)
    outage = _HubOutage(hub_server, hub, tmp_path / "checkpoints")
    # Waiting for the Hub once it is back: two HTTP 500s, a dropped upload-mode request and a
    # commit whose answer is lost after it landed.
    hub_server.fail_next("commit", times=2, status=500)
    hub_server.drop_next("preupload", stage="before_processing")
    hub_server.drop_next("commit", stage="after_processing")
    lm = _lm()
    trainer = _trainer(lm, tmp_path / "checkpoints", 6, [outage, hub], max_checkpoints=1)
    state = trainer.fit()

    # Training never waited for the Hub: every chunk ran while it was down. Step 4 (due every 4
    # steps) was not pruned before its push was confirmed (max_checkpoints=1); step 2 (not due)
    # was.
    assert state.step == 6
    assert outage.local_steps == [6, 4] and outage.pushed == []
    # Once the Hub was back, step 4 and the final step 6 were pushed, in order, once each.
    assert [pushed.step for pushed in hub.pushed] == [4, 6] and not hub.unpushed
    assert [title.split(":")[0] for title in _titles(hub_server)] == [
        "Checkpoint at step 4",
        "Checkpoint at step 6",
    ]
    commit_statuses = [request.status for request in hub_server.requests_of("commit")]
    assert commit_statuses.count(500) == 2 and None in commit_statuses
    assert "Retrying" in caplog.text and "keeps failing" in caplog.text
    np.testing.assert_array_equal(_logits(keras_glam.GLaMCausalLM.from_preset(HANDLE)), _logits(lm))

    # The token is in no log line, printed text, card, checkpoint or preset.
    texts = [caplog.text, *capfd.readouterr()]
    files = [path for root in (tmp_path, hub_server.storage_dir.parent) for path in root.rglob("*")]
    files = [path for path in files if path.is_file()]
    assert len(files) > 20
    assert not any(hub_server.write_token in text for text in texts)
    assert not any(hub_server.write_token.encode() in path.read_bytes() for path in files)


def test_plain_fit_pushes_every_n_steps_and_supersedes_a_backlog(hub_server, tmp_path, caplog):
    lm = _lm()
    hub = HubCheckpoint(
        HANDLE, every_n_steps=1, checkpoint_dir=tmp_path / "a", max_waiting_pushes=1, **FAST
    )
    texts = [f"def function_{index}(argument):" for index in range(12)]
    with caplog.at_level(logging.WARNING):
        outage = _HubOutage(hub_server, hub, tmp_path / "a")
        lm.fit(texts, batch_size=2, epochs=1, callbacks=[outage, hub])

    assert outage.pushed == []
    # With the Hub down, the first checkpoint kept retrying while the others arrived; with one
    # waiting place, each newer checkpoint superseded the waiting one: two pushes, the newest
    # last. (Which of steps 1 and 2 went first depends on when the worker thread started.)
    pushed = [pushed.step for pushed in hub.pushed]
    superseded = [checkpoint.step for checkpoint in hub.superseded]
    assert len(pushed) == 2 and pushed[-1] == 6
    assert sorted(pushed + superseded) == [1, 2, 3, 4, 5, 6]
    assert "superseded by step" in caplog.text
    assert [title.split(":")[0] for title in _titles(hub_server)] == [
        f"Checkpoint at step {step}" for step in pushed
    ]
    np.testing.assert_array_equal(_logits(keras_glam.GLaMCausalLM.from_preset(HANDLE)), _logits(lm))

    # Resuming by hand outside a Trainer: the downloaded state restores exactly.
    checkpoint = pull_latest_checkpoint(HANDLE, tmp_path / "b")
    assert checkpoint.step == 6
    restored = _lm(seed=99)
    state = CheckpointManager(tmp_path / "b").restore(checkpoint, restored)
    assert state["step"] == 6 and state["loss"] > 0
    for expected, actual in zip(_weights(lm), _weights(restored), strict=True):
        np.testing.assert_array_equal(expected, actual)
    for expected, actual in zip(lm.optimizer.variables, restored.optimizer.variables, strict=True):
        np.testing.assert_array_equal(expected.numpy(), actual.numpy())

    # A Hub that stays down: `fit` ends after the bounded wait, naming what is unpushed, and the
    # checkpoints stay on disk for a later push.
    hub.flush_timeout = 0.5
    hub_server.stop()
    with caplog.at_level(logging.WARNING):
        lm.fit(texts[:4], batch_size=2, epochs=1, callbacks=[hub])
    assert [checkpoint.step for checkpoint in hub.unpushed] == [7, 8]
    assert "2 checkpoint(s) not pushed to hf://glam-org/glam-run within 0.5 s (steps 7, 8)" in (
        caplog.text
    )
    local_steps = {checkpoint.step for checkpoint in CheckpointManager(tmp_path / "a").checkpoints()}
    assert {7, 8} <= local_steps
    hub_server.start()
    assert hub.wait(timeout=30) and hub.pushed[-1].step == 8


def test_unpushed_checkpoints_are_kept_and_a_permanent_failure_ends_pushing(
    hub_server, tmp_path, caplog
):
    lm = _lm()  # compiled, never trained: the pusher's policy needs no training
    manager = CheckpointManager(tmp_path / "checkpoints", max_to_keep=1)
    repository = CheckpointRepository(
        REPO_ID,
        endpoint=hub_server.url,
        token=hub_server.write_token,
        max_retries=FAST["max_retries"],
        initial_retry_delay=FAST["initial_retry_delay"],
        max_retry_delay=FAST["max_retry_delay"],
    )
    pusher = CheckpointPusher(repository, retry_pause=FAST["max_retry_delay"])

    def save_and_submit(step):
        checkpoint = manager.save(lm, {"step": step, "loss": 1.0 / step})
        manager.hold(checkpoint)
        preset_dir = tmp_path / f"preset_{step}"
        lm.save_to_preset(preset_dir)
        job = PushJob(checkpoint, str(preset_dir), functools.partial(manager.release, checkpoint))
        return checkpoint, pusher.submit(job)

    hub_server.stop()
    first, queued = save_and_submit(1)
    assert queued and not pusher.flush(timeout=0.3)  # the Hub is down: nothing confirmed
    second, _ = save_and_submit(2)
    assert [checkpoint.step for checkpoint in manager.checkpoints()] == [2, 1]  # 1 is held
    assert pusher.unpushed == [first, second]
    pusher.stop()
    hub_server.start()
    assert pusher.flush(timeout=30)  # resumes the stopped worker
    assert [pushed.step for pushed in pusher.pushed] == [1, 2] and not pusher.unpushed
    assert not (tmp_path / "preset_1").exists()
    manager.save(lm, {"step": 3})
    assert [checkpoint.step for checkpoint in manager.checkpoints()] == [3]  # released, pruned

    # A server (or proxy) that echoes the request's credentials into its error message.
    echo = f"Forbidden for 'Authorization: Bearer {hub_server.write_token}'"
    hub_server.fail_next("commit", status=403, message=echo)
    fourth, _ = save_and_submit(4)
    with caplog.at_level(logging.ERROR):
        assert not pusher.flush(timeout=30)
    assert pusher.error.response.status_code == 403 and "failed permanently" in caplog.text
    assert "Bearer <redacted>" in caplog.text and hub_server.write_token not in caplog.text
    assert pusher.unpushed == [fourth]
    assert save_and_submit(5)[1] is False  # refused: pushing has ended
    assert 4 in [checkpoint.step for checkpoint in manager.checkpoints()]  # kept locally
    assert len(hub_server.commits(REPO_ID)) == 3  # creation, steps 1 and 2


def test_missing_or_read_only_tokens_fail_before_training(hub_server, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubAuthError, match="No Hugging Face token found.*HF_TOKEN"):
        HubCheckpoint(HANDLE)
    with pytest.raises(HubAuthError, match="read-only"):
        HubCheckpoint(HANDLE, token=hub_server.read_token)
    with pytest.raises(HubAuthError, match=f"'{READ_ONLY_ORG}'"):
        HubCheckpoint(f"hf://{READ_ONLY_ORG}/run", token=hub_server.write_token)
    assert {request.kind for request in hub_server.requests} <= {"whoami", "unsupported"}

    # The client's stored login (`hf auth login`) is used when HF_TOKEN is not set.
    login = tmp_path / "token"
    login.write_text(hub_server.write_token)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(login))
    assert HubCheckpoint(f"hf://{WRITABLE_ORG}/run").handle == f"hf://{WRITABLE_ORG}/run"
    assert not hub_server.repo_exists(f"{WRITABLE_ORG}/run")  # created by the first push only


def _commit_checkpoint_folder(name, files):
    huggingface_hub.HfApi().create_repo(REPO_ID, exist_ok=True)
    huggingface_hub.HfApi().create_commit(
        REPO_ID,
        operations=[
            CommitOperationAdd(f"checkpoints/{name}/{file}", content)
            for file, content in files.items()
        ],
        commit_message=f"add {name}",
    )


def _remote_manifest(name, files):
    """The manifest `HubCheckpoint` writes for a checkpoint folder of `{file: bytes}`."""
    sequence, step = parse_checkpoint_name(name)
    listed = {
        file: {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
        for file, content in files.items()
    }
    record = {"format": MANIFEST_FORMAT, "name": name, "sequence": sequence, "step": step}
    return json.dumps({**record, "files": listed}).encode()


def test_a_pull_skips_a_checkpoint_with_a_malformed_state_for_the_previous_one(
    hub_server, tmp_path, caplog
):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="out")], name="net")
    model.compile(optimizer=keras.optimizers.SGD(0.1, name="sgd"), loss="mse")
    manager = CheckpointManager(tmp_path / "written")
    for step in (2, 4):
        checkpoint = manager.save(model, {"step": step})
        files = {file.name: file.read_bytes() for file in pathlib.Path(checkpoint.path).iterdir()}
        if step == 4:  # A record without its manifest of the files, consistently uploaded.
            record = json.loads(files["state.json"])
            del record["files"]
            files["state.json"] = json.dumps(record).encode()
        name = pathlib.Path(checkpoint.path).name
        _commit_checkpoint_folder(name, {**files, MANIFEST_FILE: _remote_manifest(name, files)})

    with caplog.at_level(logging.WARNING):
        pulled = pull_latest_checkpoint(HANDLE, tmp_path / "pulled")
    assert (pulled.sequence, pulled.step) == (0, 2)
    assert "Skipping checkpoint ckpt-000001-step-000000004" in caplog.text
    assert "state.json has no manifest of the files" in caplog.text
    assert CheckpointManager(tmp_path / "pulled").latest() == pulled


def test_repositories_that_cannot_be_resumed_from_are_refused_before_training(
    hub_server, tmp_path
):
    _commit_checkpoint_folder("ckpt-000001-step-000000002", {"state.json": b"{}"})
    lm = _lm()
    fresh_run = _trainer(lm, tmp_path / "a", 4, [HubCheckpoint(HANDLE, **FAST)], resume=False)
    with pytest.raises(FileExistsError, match="already holds checkpoints.*resume=True"):
        fresh_run.fit()
    resumed = _trainer(lm, tmp_path / "b", 4, [HubCheckpoint(HANDLE, **FAST)])
    with pytest.raises(RemoteCheckpointError, match="none is complete.*Delete the 'checkpoints/'"):
        resumed.fit()
    assert not CheckpointManager(tmp_path / "b").checkpoints()  # nothing was trained


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"checkpoint_dir": "run"}, "pass `every_n_steps` too"),
        ({"every_n_steps": 0}, "`every_n_steps` must be None or an integer >= 1"),
        ({"revision": "a" * 40}, "revision must be a branch name"),
        ({"flush_timeout": -1}, "`flush_timeout` must be >= 0"),
    ],
)
def test_bad_arguments_are_refused(hub_server, arguments, message):
    with pytest.raises(ValueError, match=message):
        HubCheckpoint(HANDLE, **arguments)


def test_publish_model_saves_renders_our_card_and_commits_once(hub_server, tmp_path):
    lm = _lm()
    plot = tmp_path / "training_loss.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n")
    result = publish_model(
        lm,
        f"hf://{WRITABLE_ORG}/glam-tiny",
        training_data="random tokens",
        training_steps=6,
        metrics={"held-out cross-entropy": 3.25},
        loss_plot=plot,
    )
    files = hub_server.files(f"{WRITABLE_ORG}/glam-tiny")
    assert set(files) == {".gitattributes", "training_loss.png", *PRESET_FILES}
    assert len(hub_server.commits(f"{WRITABLE_ORG}/glam-tiny")) == 2  # creation + the preset
    card = files["README.md"].decode()
    total, activated = keras_glam.count_params(lm.backbone.get_config())
    for text in (
        f"| Total | {total:,}",
        f"| Activated per token | {activated:,}",
        "- Data: random tokens",
        "- Steps: 6",
        "| held-out cross-entropy | 3.25 |",
        "![Training loss](training_loss.png)",
    ):
        assert text in card
    loaded = keras_glam.GLaMCausalLM.from_preset(result.handle)
    np.testing.assert_array_equal(_logits(loaded), _logits(lm))
    with pytest.raises(ValueError, match="loss_plot must be an existing .png file"):
        publish_model(lm, result.handle, loss_plot=tmp_path / "missing.png")


def test_eval_results_reach_every_pushed_card(hub_server, tmp_path):
    """glam-eval's results.json given to HubCheckpoint lands in the card's model-index."""
    results = {
        "runs": [{
            "num_fewshot": 0,
            "results": {"arc_easy": {"acc,none": 0.625, "acc_stderr,none": 0.01}},
            "configs": {"arc_easy": {"dataset_path": "allenai/ai2_arc", "test_split": "test"}},
            "n-shot": {"arc_easy": 0},
        }],
        "missing_tasks": [],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    hub = HubCheckpoint(HANDLE, eval_results=str(path), **FAST)
    _trainer(_lm(), tmp_path / "run", 2, [hub]).fit()
    card = hub_server.files(REPO_ID)["README.md"].decode()
    assert "model-index" in card and "arc_easy" in card and "0.625" in card


def test_unreadable_eval_results_fail_before_training(hub_server, tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        HubCheckpoint(HANDLE, eval_results=str(tmp_path / "missing.json"), **FAST)
