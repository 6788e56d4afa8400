"""Publish a Keras preset directory to the Hugging Face Hub: one commit, our model card.

Why not `keras_hub.upload_preset`: when the remote repository has no README it writes KerasHub's
generic card over any README.md in the preset directory and deletes that file afterwards (our card
would be lost twice: remotely and locally). Why not `HfApi.upload_folder`: with `hf_xet` installed
it switches to a pipelined upload that may split a folder into several commits, and it can only
upload files that exist on disk. This module builds the operations itself and sends them with
`HfApi.create_commit`: one commit holding the preset files, our README.md (from memory, the preset
directory is never modified) and the deletion of remote files the new preset no longer has.
"""

import json
import logging
import pathlib
import re
from dataclasses import dataclass

import h5py
import huggingface_hub
from huggingface_hub import CommitOperationAdd
from huggingface_hub import CommitOperationDelete

from keras_glam.hub.auth import check_write_access
from keras_glam.hub.auth import resolve_token
from keras_glam.hub.retry import call_with_retries

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_INDEX = "model.weights.json"
README_FILE = "README.md"
# Keras names shards f"{base}_{index:05}.weights.h5" next to the index.
_SHARD_FILE = re.compile(r"model_\d+\.weights\.h5")
# Never uploaded: version control and the Hub client's local-dir metadata.
_IGNORED_DIRS = (".git", ".cache/huggingface")
# Never deleted from a repository by a commit that replaces its files: the Hub's own
# attributes file.
KEPT_REMOTE_FILES = (".gitattributes",)
_COMMIT_ID = re.compile(r"[0-9a-f]{40}")


class PresetValidationError(ValueError):
    """The preset directory is incomplete or inconsistent; nothing was uploaded."""


@dataclass(frozen=True)
class PublishResult:
    """What `publish_preset` committed.

    Attributes:
        handle: "hf://namespace/name", ready for `from_preset`.
        repo_id: "namespace/name".
        revision: the branch committed to.
        commit_id: the commit holding the preset (the previous one if nothing changed).
        commit_url: the commit's web address.
        uploaded: repository paths sent in the commit (README.md included).
        deleted: stale repository paths the commit removed.
    """

    handle: str
    repo_id: str
    revision: str
    commit_id: str
    commit_url: str
    uploaded: tuple
    deleted: tuple


def _is_ignored(relative_path):
    return any(relative_path == d or relative_path.startswith(d + "/") for d in _IGNORED_DIRS)


def _load_json(path, what, fix):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PresetValidationError(f"{what} {path} is not valid JSON ({error}). {fix}") from None


def _check_hdf5(path):
    if path.stat().st_size == 0 or not h5py.is_hdf5(path):
        raise PresetValidationError(
            f"Weights file {path} is empty or not an HDF5 file (an interrupted save?). "
            "Save the preset again."
        )


def _sharded_files(index_path):
    index = _load_json(index_path, "Sharded weights index", "Save the preset again.")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise PresetValidationError(
            f"Sharded weights index {index_path} has no 'weight_map'. Save the preset again."
        )
    referenced = set()
    for value in weight_map.values():
        names = value if isinstance(value, list) else [value]
        if not all(isinstance(name, str) and _SHARD_FILE.fullmatch(name) for name in names):
            raise PresetValidationError(
                f"Sharded weights index {index_path} references {value!r}; shards must be "
                "files 'model_NNNNN.weights.h5' next to the index. Save the preset again."
            )
        referenced.update(names)
    return referenced


def _check_weights(root, files):
    has_single = WEIGHTS_FILE in files
    has_index = SHARDED_WEIGHTS_INDEX in files
    shards = {path for path in files if _SHARD_FILE.fullmatch(path)}
    if has_single and has_index:
        raise PresetValidationError(
            f"{root} holds both {WEIGHTS_FILE} and the sharded {SHARDED_WEIGHTS_INDEX}; "
            f"keras-hub would load {WEIGHTS_FILE} and ignore the shards. Keep one of them."
        )
    if has_single:
        if shards:
            raise PresetValidationError(
                f"{root} holds {WEIGHTS_FILE} and stray shard files {sorted(shards)} that no "
                "index references. Delete the shards or save the preset again."
            )
        _check_hdf5(root / WEIGHTS_FILE)
        return
    if not has_index:
        if shards:
            raise PresetValidationError(
                f"{root} holds shard files {sorted(shards)} but no {SHARDED_WEIGHTS_INDEX} "
                "index to load them with. Save the preset again."
            )
        raise PresetValidationError(
            f"{root} holds no weights: expected {WEIGHTS_FILE} or {SHARDED_WEIGHTS_INDEX} with "
            "its shards. Save the model with `save_to_preset`."
        )
    referenced = _sharded_files(root / SHARDED_WEIGHTS_INDEX)
    missing = sorted(referenced - shards)
    if missing:
        raise PresetValidationError(
            f"{root}/{SHARDED_WEIGHTS_INDEX} references shard files that are missing: "
            f"{missing}. Copy the complete preset directory or save it again."
        )
    unreferenced = sorted(shards - referenced)
    if unreferenced:
        raise PresetValidationError(
            f"{root} holds shard files {unreferenced} that {SHARDED_WEIGHTS_INDEX} does not "
            "reference (left over from an earlier save?). Delete them or save the preset again."
        )
    for shard in sorted(referenced):
        _check_hdf5(root / shard)


def validate_preset_dir(preset_dir):
    """Check that `preset_dir` is a complete Keras preset; return the files to upload.

    Requires a parseable `config.json` with a `registered_name`, and complete weights: either
    `model.weights.h5`, or `model.weights.json` whose `weight_map` references shard files that
    all exist (and no stray shard), every weights file a readable HDF5 file. `.git/` and
    `.cache/huggingface/` are skipped.

    Args:
        preset_dir: a directory written by `save_to_preset`.

    Returns:
        Sorted POSIX paths relative to `preset_dir`.

    Raises:
        PresetValidationError: naming the problem and the fix.

    Example:
    ```python
    causal_lm.save_to_preset("glam_tiny_preset")
    validate_preset_dir("glam_tiny_preset")
    # ["assets/tokenizer/vocabulary.spm", "config.json", "metadata.json", ...]
    ```
    """
    root = pathlib.Path(preset_dir)
    if not root.is_dir():
        raise PresetValidationError(
            f"Preset directory {root} does not exist or is not a directory. Save one with "
            "`save_to_preset(path)` first."
        )
    files = sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and not _is_ignored(path.relative_to(root).as_posix())
    )
    if CONFIG_FILE not in files:
        raise PresetValidationError(
            f"{CONFIG_FILE} is missing from {root}: this is not a Keras preset. Save one with "
            "`save_to_preset(path)`."
        )
    config = _load_json(root / CONFIG_FILE, "Config file", "Save the preset again.")
    if not isinstance(config, dict) or "registered_name" not in config:
        raise PresetValidationError(
            f"{root / CONFIG_FILE} has no 'registered_name', so keras-hub cannot find the "
            "class to load. Save the preset with `save_to_preset`."
        )
    _check_weights(root, files)
    return files


def _card_text(root, files, model_card):
    if model_card is not None:
        if not isinstance(model_card, str) or not model_card.strip():
            raise ValueError("model_card must be the card's non-empty Markdown text.")
        return model_card
    if README_FILE in files:
        return (root / README_FILE).read_text(encoding="utf-8")
    raise ValueError(
        f"No model card: pass model_card=render_model_card(...) or put a {README_FILE} in "
        f"{root}. keras_glam never publishes a repository without its own card."
    )


def check_branch_revision(revision):
    """Refuse a `revision` that cannot be committed to: not a string, or a commit id.

    Args:
        revision: a branch name, or None for `main`.

    Raises:
        ValueError: `revision` is a commit id or not a string.
    """
    if revision is not None and (not isinstance(revision, str) or _COMMIT_ID.fullmatch(revision)):
        raise ValueError(
            f"revision must be a branch name, got {revision!r}: a commit id cannot be committed to."
        )


def refuse_leaked_token(root, files, card, token):
    """Refuse to upload a file or card that contains the Hub token (weights are not scanned).

    Args:
        root: `pathlib.Path` of the directory the files are in.
        files: paths of the files to upload, relative to `root`.
        card: the model card's text.
        token: the Hub token.

    Raises:
        ValueError: naming the card or the file that contains the token.
    """
    secret = token.encode()
    if secret in card.encode():
        raise ValueError(
            "The model card contains the Hugging Face token; remove it before publishing."
        )
    for path in files:
        if not path.endswith(".h5") and secret in (root / path).read_bytes():
            raise ValueError(
                f"{root / path} contains the Hugging Face token; remove it before publishing."
            )


def publish_preset(
    preset_dir,
    handle,
    *,
    model_card=None,
    commit_message=None,
    private=False,
    revision=None,
    delete_stale_files=True,
    max_retries=4,
    initial_retry_delay=1.0,
    token=None,
):
    """Upload a preset directory to the Hugging Face Hub in one commit, with our model card.

    In order, before anything is uploaded: validate the directory (`validate_preset_dir`), pick
    the card, make sure no file to upload contains the token, and check that the token may write
    the repository (`check_write_access`). Then
    `create_repo(exist_ok=True)`, create the branch `revision` if it is new, and send one commit
    with every preset file, the card as README.md and (with `delete_stale_files`) the deletion of
    repository files the preset no longer has: a stale `model.weights.h5` left by an earlier
    upload would otherwise shadow new sharded weights, since keras-hub loads it first.

    Each step is retried with exponential backoff on connection errors, HTTP 408, 429 and 5xx
    (waiting at least as long as a `Retry-After` asks), never on other 4xx. A retried commit is
    safe: the client skips files whose content the Hub already holds, so a commit that landed but
    whose answer was lost is not duplicated.

    Args:
        preset_dir: a directory written by `save_to_preset`.
        handle: "hf://namespace/name", or "hf://name" for the token's own namespace.
        model_card: the README.md text (see `render_model_card`); None uses the directory's
            README.md, and refuses to publish without one.
        commit_message: the commit's title; a default names the repository.
        private: visibility of the repository if this call creates it (an existing
            repository keeps its visibility).
        revision: the branch to commit to (created from `main` if missing); None is `main`.
        delete_stale_files: delete repository files that are not in the preset
            (`.gitattributes` is kept).
        max_retries: retries per step on transient failures.
        initial_retry_delay: seconds before the first retry; doubles after each.
        token: the Hub token; None uses the Hub client's own (`HF_TOKEN`, `hf auth login`, ...:
            see `resolve_token`).

    Returns:
        A `PublishResult` with the commit id and url.

    Raises:
        PresetValidationError: the directory is not a complete preset (nothing was sent).
        HubAuthError: no token, or one without write access (nothing was written).
        HubUnavailableError: the Hub could not be reached within the retry budget.

    Example:
    ```python
    causal_lm.save_to_preset("glam_tiny_preset")
    total, activated = keras_glam.count_params(causal_lm.backbone.get_config())
    card = render_model_card(
        "hf://glam-org/glam-tiny",
        backbone_config=causal_lm.backbone.get_config(),
        total_params=total,
        activated_params=activated,
    )
    result = publish_preset("glam_tiny_preset", "hf://glam-org/glam-tiny", model_card=card)
    result.commit_url
    ```
    """
    root = pathlib.Path(preset_dir)
    files = validate_preset_dir(root)
    card = _card_text(root, files, model_card)
    check_branch_revision(revision)
    branch = revision or "main"
    token = resolve_token(token)
    if token is not None:
        refuse_leaked_token(root, files, card, token)
    access = check_write_access(
        handle, token=token, max_retries=max_retries, initial_retry_delay=initial_retry_delay
    )
    repo_id = access.repo_id
    api = huggingface_hub.HfApi(endpoint=access.endpoint, token=token)

    def retried(description, operation):
        return call_with_retries(
            operation,
            description=f"{description} {repo_id}",
            endpoint=access.endpoint,
            max_retries=max_retries,
            initial_delay=initial_retry_delay,
            secrets=(token,),
        )

    retried("create_repo", lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    if branch != "main":
        retried("create_branch", lambda: api.create_branch(repo_id, branch=branch, exist_ok=True))
    uploaded = tuple(sorted({*files, README_FILE}))

    def commit():
        # Operations are rebuilt on every attempt: the client caches upload modes on them.
        remote = set(api.list_repo_files(repo_id, revision=branch)) if delete_stale_files else set()
        stale = tuple(sorted(remote - set(uploaded) - set(KEPT_REMOTE_FILES)))
        operations = [CommitOperationDelete(path_in_repo=path) for path in stale]
        operations += [
            CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(root / path))
            for path in files
            if path != README_FILE
        ]
        operations.append(
            CommitOperationAdd(path_in_repo=README_FILE, path_or_fileobj=card.encode())
        )
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload GLaM preset {repo_id} with keras_glam",
            revision=branch,
        )
        return info, stale

    info, deleted = retried("create_commit", commit)
    logger.info(
        "Published hf://%s (%s) at commit %s: %s", repo_id, branch, info.oid, info.commit_url
    )
    return PublishResult(
        handle=f"hf://{repo_id}",
        repo_id=repo_id,
        revision=branch,
        commit_id=info.oid,
        commit_url=info.commit_url,
        uploaded=uploaded,
        deleted=deleted,
    )
