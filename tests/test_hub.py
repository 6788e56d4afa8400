"""Hugging Face Hub publishing, through the real `huggingface_hub` client and a local Hub server.

Every upload and download below is made by `huggingface_hub` 2.4 itself (`HfApi.create_commit`,
`hf_hub_download`, keras-hub's `get_file`) against `hub_server.HubServer`, which checks what the
client sends; nothing is mocked except the clock of `call_with_retries` in two unit tests.
"""

import datetime
import email.utils
import json
import logging
import pathlib

import h5py
import httpx2
import huggingface_hub
import numpy as np
import pytest
from hub_server import READ_ONLY_ORG
from hub_server import USER
from hub_server import WRITABLE_ORG
from hub_server import build_hub_cache
from hub_server import git_blob_id
from hub_server import set_hub_offline
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.errors import RemoteEntryNotFoundError
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.errors import RevisionNotFoundError
from keras_hub.src.utils import preset_utils

from keras_glam.hub import HubAuthError
from keras_glam.hub import HubUnavailableError
from keras_glam.hub import PresetValidationError
from keras_glam.hub import call_with_retries
from keras_glam.hub import check_write_access
from keras_glam.hub import find_loss_plot
from keras_glam.hub import publish_preset
from keras_glam.hub import render_model_card
from keras_glam.hub import resolve_token
from keras_glam.hub import validate_preset_dir
from keras_glam.hub.retry import is_transient


HANDLE = f"hf://{WRITABLE_ORG}/glam-tiny"
REPO_ID = f"{WRITABLE_ORG}/glam-tiny"
MOE_CONFIG = {
    "vocabulary_size": 4096,
    "num_layers": 3,
    "hidden_dim": 16,
    "intermediate_dim": 32,
    "num_heads": 2,
    "head_dim": 8,
    "num_experts": 4,
    "moe_layer_interval": 2,
    "top_k": 2,
    "capacity_factor": 2.0,
}
FAST_RETRIES = {"max_retries": 3, "initial_retry_delay": 0.01}


def _write_h5(path, seed):
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as weights:
        weights.create_dataset("vars/0", data=rng.standard_normal((4, 8)).astype("float32"))


def _write_preset(root, *, seed=0, sharded=False):
    """A small hand-made preset with the files `save_to_preset` writes (contents are arbitrary).

    The sharded index has Keras's format (checked against `Model.save_weights(
    "model.weights.json", max_shard_size=...)`): a `weight_map` from variable paths to one shard
    name or a list of them.
    """
    root = pathlib.Path(root)
    (root / "assets" / "tokenizer").mkdir(parents=True, exist_ok=True)
    config = {
        "module": "keras_glam.models.glam_backbone",
        "class_name": "GLaMBackbone",
        "config": {**MOE_CONFIG, "seed": seed},
        "registered_name": "keras_glam>GLaMBackbone",
    }
    (root / "config.json").write_text(json.dumps(config, indent=4))
    (root / "metadata.json").write_text(
        json.dumps({"keras_version": "3.15.1", "parameter_count": 1234})
    )
    (root / "tokenizer.json").write_text(json.dumps({"class_name": "GLaMTokenizer", "seed": seed}))
    rng = np.random.default_rng(seed)
    (root / "assets" / "tokenizer" / "vocabulary.spm").write_bytes(rng.bytes(3000))
    for stale in root.glob("model*.weights.*"):
        stale.unlink()
    if sharded:
        _write_h5(root / "model_00000.weights.h5", seed)
        _write_h5(root / "model_00001.weights.h5", seed + 1)
        weight_map = {
            "/layers/token_embedding/vars": "model_00000.weights.h5",
            "/layers/decoder_block_0/vars": ["model_00000.weights.h5", "model_00001.weights.h5"],
        }
        (root / "model.weights.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    else:
        _write_h5(root / "model.weights.h5", seed)
    return root


def _card(handle=HANDLE, **overrides):
    arguments = {
        "backbone_config": MOE_CONFIG,
        "total_params": 1_234_567,
        "activated_params": 456_789,
        "training_data": "Python documentation strings (pydoc_data.topics)",
        "training_steps": 1000,
        "metrics": {"validation loss": 3.21, "accuracy": 0.4567},
        "loss_plot": "loss.png",
        **overrides,
    }
    return render_model_card(handle, **arguments)


def _snapshot(root):
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _download(repo_id, path, **kwargs):
    return pathlib.Path(huggingface_hub.hf_hub_download(repo_id, path, **kwargs)).read_bytes()


# ------------------------------------------------------------------------------------------------
# The local Hub itself: the real client must meet the Hub's errors and rules.


def test_fixture_routes_every_client_entry_point_to_the_local_hub(hub_server):
    assert huggingface_hub.whoami()["name"] == USER  # module-level HfApi, token from HF_TOKEN
    assert huggingface_hub.get_token() == hub_server.write_token
    assert constants.HF_HUB_DISABLE_XET
    assert (
        huggingface_hub.hf_hub_url(REPO_ID, "a/b.json")
        == f"{hub_server.url}/{REPO_ID}/resolve/main/a/b.json"
    )
    assert [request.kind for request in hub_server.requests if request.kind != "unsupported"] == [
        "whoami"
    ]


def test_server_answers_missing_repo_revision_and_file_like_the_hub(hub_server):
    api = huggingface_hub.HfApi()
    api.create_repo(REPO_ID)
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=REPO_ID)
    with pytest.raises(RemoteEntryNotFoundError):
        huggingface_hub.hf_hub_download(REPO_ID, "missing.json")
    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.hf_hub_download(f"{WRITABLE_ORG}/no-such-repo", "config.json")
    with pytest.raises(RevisionNotFoundError):
        huggingface_hub.hf_hub_download(REPO_ID, "config.json", revision="f" * 40)
    assert _download(REPO_ID, "config.json") == b"{}"


def test_server_enforces_tokens_on_writes(hub_server):
    api = huggingface_hub.HfApi()
    with pytest.raises(HfHubHTTPError) as anonymous:
        api.create_repo(REPO_ID, token=False)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as read_only:
        api.create_repo(REPO_ID, token=hub_server.read_token)
    assert read_only.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        api.whoami(token="hf_not_a_token")

    api.create_repo(REPO_ID)
    with pytest.raises(HfHubHTTPError) as commit:
        api.upload_file(
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO_ID, token=hub_server.read_token
        )
    assert commit.value.response.status_code == 403
    assert len(hub_server.commits(REPO_ID)) == 1  # only the repository's initial commit


def test_server_applies_file_and_folder_deletions(hub_server, tmp_path):
    publish_preset(_write_preset(tmp_path / "preset"), HANDLE, model_card=_card())
    api = huggingface_hub.HfApi()
    api.delete_folder("assets", repo_id=REPO_ID, commit_message="Drop assets")
    api.delete_file("tokenizer.json", repo_id=REPO_ID)
    assert not any(path.startswith("assets/") for path in hub_server.files(REPO_ID))
    assert "tokenizer.json" not in hub_server.files(REPO_ID)
    assert "tokenizer.json" in hub_server.files(REPO_ID, hub_server.commits(REPO_ID)[2].commit_id)
    with pytest.raises(RemoteEntryNotFoundError):
        api.delete_file("tokenizer.json", repo_id=REPO_ID)


def test_server_lists_trees_and_path_infos(hub_server, tmp_path):
    preset = _write_preset(tmp_path / "preset")
    publish_preset(preset, HANDLE, model_card=_card())
    api = huggingface_hub.HfApi()
    top = {entry.path: type(entry).__name__ for entry in api.list_repo_tree(REPO_ID)}
    assert top["assets"] == "RepoFolder" and top["config.json"] == "RepoFile"
    assert "assets/tokenizer/vocabulary.spm" not in top
    nested = list(api.list_repo_tree(REPO_ID, path_in_repo="assets", recursive=True))
    assert [entry.path for entry in nested] == [
        "assets/tokenizer",
        "assets/tokenizer/vocabulary.spm",
    ]
    assert nested[1].size == 3000
    infos = api.get_paths_info(REPO_ID, ["config.json", "assets", "missing.txt"])
    content = (preset / "config.json").read_bytes()
    assert [(info.path, getattr(info, "blob_id", None)) for info in infos] == [
        ("config.json", git_blob_id(content)),
        ("assets", None),
    ]
    assert huggingface_hub.file_exists(REPO_ID, "config.json")
    assert not huggingface_hub.file_exists(REPO_ID, "missing.txt")


def test_private_repository_is_hidden_from_anonymous_downloads(hub_server, tmp_path):
    publish_preset(_write_preset(tmp_path / "preset"), HANDLE, model_card=_card(), private=True)
    assert hub_server.is_private(REPO_ID)
    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.hf_hub_download(REPO_ID, "config.json", token=False)
    assert _download(REPO_ID, "config.json") == (tmp_path / "preset" / "config.json").read_bytes()


# ------------------------------------------------------------------------------------------------
# Publishing.


def test_publish_round_trip_is_byte_identical_in_one_commit_with_our_card(hub_server, tmp_path):
    preset = _write_preset(tmp_path / "preset")
    (preset / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(64)))
    before = _snapshot(preset)
    card = _card()

    result = publish_preset(preset, HANDLE, model_card=card, commit_message="Add glam-tiny")

    assert _snapshot(preset) == before  # the preset directory is left alone (no README written)
    assert result.handle == HANDLE
    assert result.uploaded == tuple(sorted([*before, "README.md"]))
    for path, content in before.items():  # one file at a time, as keras-hub's from_preset does
        assert _download(REPO_ID, path) == content, path
    assert _download(REPO_ID, "README.md").decode() == card
    history = hub_server.commits(REPO_ID)
    assert [commit.title for commit in history] == ["Add glam-tiny", "initial commit"]
    assert history[0].commit_id == result.commit_id
    assert result.commit_url == f"{hub_server.url}/{REPO_ID}/commit/{result.commit_id}"
    assert [c.title for c in huggingface_hub.HfApi().list_repo_commits(REPO_ID)] == [
        "Add glam-tiny",
        "initial commit",
    ]
    refs_main = (
        pathlib.Path(constants.HF_HUB_CACHE)
        / f"models--{WRITABLE_ORG}--glam-tiny"
        / "refs"
        / "main"
    )
    assert refs_main.read_text() == result.commit_id
    assert set(hub_server.files(REPO_ID)) == {*before, "README.md", ".gitattributes"}


def test_an_older_revision_downloads_the_older_files(hub_server, tmp_path):
    preset = _write_preset(tmp_path / "preset", seed=1)
    first_files = _snapshot(preset)
    first = publish_preset(preset, HANDLE, model_card=_card(), commit_message="v1")
    _write_preset(preset, seed=2)
    second_files = _snapshot(preset)
    second = publish_preset(
        preset, HANDLE, model_card=_card(training_steps=2000), commit_message="v2"
    )

    assert first.commit_id != second.commit_id
    for path in ("config.json", "model.weights.h5", "assets/tokenizer/vocabulary.spm"):
        assert first_files[path] != second_files[path]
        assert _download(REPO_ID, path, revision=first.commit_id) == first_files[path]
        assert _download(REPO_ID, path) == second_files[path]
    assert b"1,000" in _download(REPO_ID, "README.md", revision=first.commit_id)
    assert [c.title for c in hub_server.commits(REPO_ID)] == ["v2", "v1", "initial commit"]


def test_sharded_weights_replace_single_file_weights_and_stale_files_go(hub_server, tmp_path):
    single = publish_preset(_write_preset(tmp_path / "single"), HANDLE, model_card=_card())
    sharded_dir = _write_preset(tmp_path / "sharded", sharded=True)
    sharded = publish_preset(sharded_dir, HANDLE, model_card=_card())

    assert sharded.deleted == ("model.weights.h5",)
    # keras-hub loads model.weights.h5 first when it exists: a stale one would shadow the shards.
    assert not preset_utils.check_file_exists(HANDLE, "model.weights.h5")
    for path in ("model.weights.json", "model_00000.weights.h5", "model_00001.weights.h5"):
        assert _download(REPO_ID, path) == (sharded_dir / path).read_bytes()
    assert (
        _download(REPO_ID, "model.weights.h5", revision=single.commit_id)
        == (tmp_path / "single" / "model.weights.h5").read_bytes()
    )
    assert ".gitattributes" in hub_server.files(REPO_ID)


def test_publishing_to_a_branch_leaves_main_untouched(hub_server, tmp_path):
    main = publish_preset(_write_preset(tmp_path / "main", seed=1), HANDLE, model_card=_card())
    dev_dir = _write_preset(tmp_path / "dev", seed=2)
    dev = publish_preset(dev_dir, HANDLE, model_card=_card(), revision="dev")

    assert dev.revision == "dev"
    assert hub_server.commits(REPO_ID, "main")[0].commit_id == main.commit_id
    assert hub_server.commits(REPO_ID, "dev")[1].commit_id == main.commit_id  # branched from main
    assert (
        _download(REPO_ID, "config.json", revision="dev") == (dev_dir / "config.json").read_bytes()
    )
    assert _download(REPO_ID, "config.json") == (tmp_path / "main" / "config.json").read_bytes()


def test_republishing_an_unchanged_preset_makes_no_new_commit(hub_server, tmp_path):
    preset = _write_preset(tmp_path / "preset")
    first = publish_preset(preset, HANDLE, model_card=_card())
    second = publish_preset(preset, HANDLE, model_card=_card())
    assert second.commit_id == first.commit_id
    assert len(hub_server.commits(REPO_ID)) == 2


def test_keras_hub_reads_the_published_preset_one_file_at_a_time(hub_server, tmp_path):
    preset = _write_preset(tmp_path / "preset")
    publish_preset(preset, HANDLE, model_card=_card())
    # `from_preset("hf://...")` resolves every file through this function.
    path = preset_utils.get_file(HANDLE, "assets/tokenizer/vocabulary.spm")
    assert (
        pathlib.Path(path).read_bytes() == (preset / "assets/tokenizer/vocabulary.spm").read_bytes()
    )
    assert preset_utils.load_json(HANDLE)["registered_name"] == "keras_glam>GLaMBackbone"
    with pytest.raises(FileNotFoundError, match="preprocessor.json"):
        preset_utils.get_file(HANDLE, "preprocessor.json")


def test_readme_in_the_preset_is_the_card_when_none_is_given(hub_server, tmp_path):
    preset = _write_preset(tmp_path / "preset")
    with pytest.raises(ValueError, match="No model card"):
        publish_preset(preset, HANDLE)
    assert not hub_server.requests
    (preset / "README.md").write_text(_card(training_steps=7))
    publish_preset(preset, HANDLE)
    assert _download(REPO_ID, "README.md") == (preset / "README.md").read_bytes()


def _remove(path):
    path.unlink()


@pytest.mark.parametrize(
    "break_preset, message",
    [
        (lambda root: _remove(root / "config.json"), "config.json is missing"),
        (lambda root: (root / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda root: (root / "config.json").write_text('{"config": {}}'), "registered_name"),
        (lambda root: _remove(root / "model.weights.h5"), "holds no weights"),
        (lambda root: (root / "model.weights.h5").write_bytes(b""), "empty or not an HDF5"),
        (
            lambda root: (root / "model.weights.h5").write_bytes(b"truncated"),
            "empty or not an HDF5",
        ),
        (lambda root: _write_h5(root / "model_00000.weights.h5", 0), "stray shard files"),
        (lambda root: (root / "model.weights.json").write_text("{}"), "both model.weights.h5"),
    ],
)
def test_a_broken_preset_is_refused_before_any_request(hub_server, tmp_path, break_preset, message):
    preset = _write_preset(tmp_path / "preset")
    break_preset(preset)
    with pytest.raises(PresetValidationError, match=message):
        publish_preset(preset, HANDLE, model_card=_card())
    assert not hub_server.requests


@pytest.mark.parametrize(
    "break_preset, message",
    [
        (
            lambda root: _remove(root / "model_00001.weights.h5"),
            r"missing: \['model_00001.weights.h5'\]",
        ),
        (lambda root: _remove(root / "model.weights.json"), "no model.weights.json index"),
        (lambda root: _write_h5(root / "model_00002.weights.h5", 2), "does not reference"),
        (
            lambda root: (root / "model.weights.json").write_text('{"weight_map": {}}'),
            "no 'weight_map'",
        ),
        (
            lambda root: (root / "model.weights.json").write_text(
                '{"weight_map": {"a": "../x.h5"}}'
            ),
            "shards must be",
        ),
    ],
)
def test_incomplete_sharded_weights_are_refused(tmp_path, break_preset, message):
    preset = _write_preset(tmp_path / "preset", sharded=True)
    break_preset(preset)
    with pytest.raises(PresetValidationError, match=message):
        validate_preset_dir(preset)


def test_validate_preset_dir_lists_files_and_skips_client_metadata(tmp_path):
    preset = _write_preset(tmp_path / "preset", sharded=True)
    (preset / ".cache" / "huggingface").mkdir(parents=True)
    (preset / ".cache" / "huggingface" / "download.lock").write_text("")
    assert validate_preset_dir(preset) == [
        "assets/tokenizer/vocabulary.spm",
        "config.json",
        "metadata.json",
        "model.weights.json",
        "model_00000.weights.h5",
        "model_00001.weights.h5",
        "tokenizer.json",
    ]
    with pytest.raises(PresetValidationError, match="does not exist"):
        validate_preset_dir(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "handle, revision, message",
    [
        (f"{WRITABLE_ORG}/glam-tiny", None, "Prefix the repository id with 'hf://'"),
        ("hf://a/b/c", None, "Invalid Hugging Face handle"),
        ("hf://org/bad name", None, "Invalid Hugging Face handle"),
        (HANDLE, "0123456789abcdef0123456789abcdef01234567", "must be a branch name"),
    ],
)
def test_bad_handles_and_revisions_are_refused(hub_server, tmp_path, handle, revision, message):
    with pytest.raises(ValueError, match=message):
        publish_preset(
            _write_preset(tmp_path / "preset"), handle, model_card=_card(), revision=revision
        )
    assert not hub_server.requests


def test_handle_without_namespace_publishes_under_the_token_user(hub_server, tmp_path):
    result = publish_preset(
        _write_preset(tmp_path / "preset"), "hf://mine", model_card=_card(f"hf://{USER}/mine")
    )
    assert result.repo_id == f"{USER}/mine"
    assert hub_server.repo_exists(f"{USER}/mine")


# ------------------------------------------------------------------------------------------------
# The model card.


def test_model_card_front_matter_architecture_parameters_and_snippet():
    card = _card()
    data = huggingface_hub.ModelCard(card).data  # the client's own front-matter parser
    assert data.library_name == "keras-hub"
    assert data.pipeline_tag == "text-generation"
    assert data.tags == ["keras", "glam", "mixture-of-experts"]
    assert data.license == "apache-2.0"
    expected_lines = [
        f"# {REPO_ID}",
        "| Decoder layers | 3 |",
        "| Hidden size | 16 |",
        "| Feed-forward size | 32 |",
        "| Attention heads | 2 x 8 |",
        "| Vocabulary | 4,096 |",
        "| Experts per MoE layer | 4 |",
        "| MoE layers | 0, 2 (the others are dense GEGLU) |",
        "| Routing | top-2 gating (GShard) |",
        "| Capacity factor | 2.0 |",
        "| Total | 1,234,567 (1.23M) |",
        "| Activated per token | 456,789 (457K) |",
        "- Data: Python documentation strings (pydoc_data.topics)",
        "- Steps: 1,000",
        "| validation loss | 3.21 |",
        "| accuracy | 0.4567 |",
        "![Training loss](loss.png)",
        f'causal_lm = keras_glam.GLaMCausalLM.from_preset("{HANDLE}")',
    ]
    lines = card.splitlines()
    for line in expected_lines:
        assert line in lines, line
    assert lines.index("| validation loss | 3.21 |") < lines.index("| accuracy | 0.4567 |")


def test_model_card_of_a_dense_model_without_optional_sections():
    dense = {key: value for key, value in MOE_CONFIG.items() if key != "num_experts"}
    card = render_model_card(
        "hf://glam-org/dense",
        backbone_config=dense,
        total_params=5_000_000_000,
        activated_params=5_000_000_000,
    )
    lines = card.splitlines()
    assert "| Experts | none (dense model) |" in lines
    assert "| Total | 5,000,000,000 (5B) |" in lines
    assert "- Data: not recorded" in lines and "- Steps: not recorded" in lines
    for absent in ("## Metrics", "## Training loss", "Routing", "Capacity factor", "!["):
        assert absent not in card, absent


def test_model_card_is_a_pure_function_of_its_inputs():
    config = dict(MOE_CONFIG)
    metrics = {"loss": 1.5}
    first = render_model_card(
        HANDLE, backbone_config=config, total_params=10, activated_params=5, metrics=metrics
    )
    second = render_model_card(
        HANDLE, backbone_config=config, total_params=10, activated_params=5, metrics=metrics
    )
    assert first == second
    assert config == MOE_CONFIG and metrics == {"loss": 1.5}
    assert "license: mit" in render_model_card(
        HANDLE, backbone_config=config, total_params=10, activated_params=5, license="mit"
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"activated_params": 2_000_000}, "cannot exceed total_params"),
        ({"total_params": 0}, "`total_params` must be an integer >= 1"),
        ({"total_params": 1.5e6}, "`total_params` must be an integer >= 1"),
        ({"backbone_config": {"num_layers": 2}}, "backbone_config lacks"),
        ({"loss_plot": "../loss.png"}, "relative path to a .png"),
        ({"loss_plot": "loss.jpg"}, "relative path to a .png"),
        ({"training_steps": -1}, "non-negative integer"),
        ({"license": ""}, "licence identifier"),
        ({"handle": "hf://glam-tiny"}, "needs the full handle"),
    ],
)
def test_model_card_rejects_bad_inputs(overrides, message):
    with pytest.raises(ValueError, match=message):
        _card(**overrides)


def test_model_card_rejects_non_numeric_metrics():
    with pytest.raises(TypeError, match="numbers or strings"):
        _card(metrics={"loss": [1.0]})


def test_find_loss_plot(tmp_path):
    assert find_loss_plot(tmp_path) is None
    (tmp_path / "curve.png").write_bytes(b"png")
    assert find_loss_plot(tmp_path) == "curve.png"
    (tmp_path / "other.png").write_bytes(b"png")
    assert find_loss_plot(tmp_path) is None  # ambiguous
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "train_loss.png").write_bytes(b"png")
    assert find_loss_plot(tmp_path) == "plots/train_loss.png"


# ------------------------------------------------------------------------------------------------
# Tokens and write access.


def test_token_resolution_order(hub_server, monkeypatch):
    assert resolve_token("hf_explicit") == "hf_explicit"
    assert resolve_token() == hub_server.write_token  # HF_TOKEN
    monkeypatch.delenv("HF_TOKEN")
    assert resolve_token() is None
    pathlib.Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(constants.HF_TOKEN_PATH).write_text(hub_server.read_token)  # `hf auth login`
    assert resolve_token() == hub_server.read_token
    monkeypatch.setenv("HF_TOKEN", "  ")
    assert resolve_token() == hub_server.read_token
    with pytest.raises(TypeError, match="string or None"):
        resolve_token(True)


def test_token_lookup_is_the_hub_clients_own(hub_server, monkeypatch):
    """`huggingface_hub.get_token()`'s order: a CI token exchanged through OIDC comes before
    HF_TOKEN; HUGGING_FACE_HUB_TOKEN counts when HF_TOKEN is unset."""
    monkeypatch.setenv("HF_TOKEN", hub_server.read_token)
    monkeypatch.setenv("HF_OIDC_RESOURCE", REPO_ID)
    monkeypatch.setenv("HF_OIDC_ID_TOKEN", hub_server.oidc_id_token)
    assert resolve_token() == hub_server.oidc_token
    assert check_write_access(HANDLE).user == USER
    assert len(hub_server.requests_of("oidc_exchange")) >= 1
    assert resolve_token("hf_explicit") == "hf_explicit"
    monkeypatch.delenv("HF_OIDC_RESOURCE")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", hub_server.scoped_token)
    assert resolve_token() == hub_server.scoped_token


def test_whoami_is_asked_once_per_token_and_never_retried_when_rate_limited(
    hub_server, tmp_path
):
    preset = _write_preset(tmp_path / "preset")
    check_write_access(HANDLE)
    check_write_access(f"hf://{USER}/mine")
    publish_preset(preset, HANDLE, model_card=_card())
    assert [request.status for request in hub_server.requests_of("whoami")] == [200]

    # Rate limited: one request, no retry (it would only extend the limit), the wait named.
    hub_server.fail_next("whoami", status=429, headers={"Retry-After": "60"})
    with pytest.raises(HubUnavailableError, match="rate-limits the token check.*in 60 s"):
        check_write_access(HANDLE, token=hub_server.scoped_token)
    assert [request.status for request in hub_server.requests_of("whoami")] == [200, 429]
    # A failure is not cached: the next check asks again.
    check_write_access(f"hf://{USER}/mine", token=hub_server.scoped_token)
    assert [request.status for request in hub_server.requests_of("whoami")] == [200, 429, 200]


@pytest.mark.parametrize(
    "token_name, handle, repo_id",
    [
        ("write_token", HANDLE, REPO_ID),
        ("write_token", f"hf://{USER}/mine", f"{USER}/mine"),
        ("write_token", "hf://mine", f"{USER}/mine"),
        ("scoped_token", f"hf://{USER}/mine", f"{USER}/mine"),
    ],
)
def test_check_write_access_accepts_tokens_that_may_write(hub_server, token_name, handle, repo_id):
    access = check_write_access(handle, token=getattr(hub_server, token_name))
    assert access.repo_id == repo_id
    assert access.user == USER
    assert access.endpoint == hub_server.url


@pytest.mark.parametrize(
    "token_name, handle, message",
    [
        ("read_token", HANDLE, "is read-only"),
        ("scoped_token", HANDLE, "has no 'repo.write' permission"),
        ("write_token", f"hf://{READ_ONLY_ORG}/x", "has the 'read' role"),
        ("write_token", "hf://someone-else/x", "is not a member"),
        (None, HANDLE, "rejected the token"),
    ],
)
def test_check_write_access_refuses_with_a_clear_error(hub_server, token_name, handle, message):
    token = getattr(hub_server, token_name) if token_name else "hf_unknown_token_value"
    with pytest.raises(HubAuthError, match=message):
        check_write_access(handle, token=token)


def test_missing_or_read_only_token_fails_before_any_write(hub_server, tmp_path, monkeypatch):
    preset = _write_preset(tmp_path / "preset")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubAuthError, match="No Hugging Face token found.*HF_TOKEN.*hf auth login"):
        publish_preset(preset, HANDLE, model_card=_card())
    assert not hub_server.requests
    with pytest.raises(HubAuthError, match="read-only"):
        publish_preset(preset, HANDLE, model_card=_card(), token=hub_server.read_token)
    assert {request.kind for request in hub_server.requests} <= {"whoami", "unsupported"}
    assert not hub_server.repo_exists(REPO_ID)


def test_offline_mode_refuses_to_publish(hub_server, tmp_path, monkeypatch):
    set_hub_offline(monkeypatch)
    with pytest.raises(HubAuthError, match="HF_HUB_OFFLINE is set"):
        publish_preset(_write_preset(tmp_path / "preset"), HANDLE, model_card=_card())


def test_the_token_never_appears_in_any_output(hub_server, tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # the client logs curl-like request dumps
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    preset = _write_preset(tmp_path / "preset")
    (preset / "loss.png").write_bytes(b"png")
    errors = []

    hub_server.fail_next("commit", times=1, status=503)  # a retry warning gets logged
    result = publish_preset(preset, HANDLE, model_card=_card(), **FAST_RETRIES)
    for path in result.uploaded:
        huggingface_hub.hf_hub_download(REPO_ID, path)
    for token, handle in ((hub_server.read_token, HANDLE), ("hf_unknown_secret_token", HANDLE)):
        with pytest.raises(HubAuthError) as error:
            publish_preset(preset, handle, model_card=_card(), token=token)
        errors.append(error.value)
    hub_server.stop()
    with pytest.raises(HubUnavailableError) as error:
        publish_preset(preset, HANDLE, model_card=_card(), **FAST_RETRIES)
    errors.append(error.value)
    hub_server.start()

    texts = [caplog.text, *capfd.readouterr()]
    for error in errors:
        while error is not None:
            texts += [str(error), repr(error)]
            error = error.__cause__ or error.__context__
    hub_root = hub_server.storage_dir.parent  # server storage, HF cache, stored-login home
    files = [path for root in (tmp_path, hub_root) for path in root.rglob("*") if path.is_file()]
    assert len(files) > 10 and "Retrying" in caplog.text
    for token in (
        hub_server.write_token,
        hub_server.read_token,
        hub_server.scoped_token,
        "hf_unknown_secret_token",
    ):
        assert not any(token in text for text in texts)
        assert not any(token.encode() in path.read_bytes() for path in files)


def test_a_token_inside_a_preset_file_is_not_uploaded(hub_server, tmp_path):
    preset = _write_preset(tmp_path / "preset")
    (preset / "tokenizer.json").write_text(json.dumps({"leak": hub_server.write_token}))
    with pytest.raises(ValueError, match="tokenizer.json contains the Hugging Face token") as error:
        publish_preset(preset, HANDLE, model_card=_card())
    assert hub_server.write_token not in str(error.value)
    assert not hub_server.requests


# ------------------------------------------------------------------------------------------------
# Retries and faults.


def test_call_with_retries_backs_off_exponentially_then_names_endpoint_and_retries():
    waits = []
    attempts = []

    def refuse():
        attempts.append(1)
        raise httpx2.ConnectError("connection refused")

    with pytest.raises(HubUnavailableError) as error:
        call_with_retries(
            refuse,
            description="whoami",
            endpoint="http://hub.example",
            max_retries=4,
            initial_delay=0.5,
            max_delay=3.0,
            sleep=waits.append,
        )
    assert waits == [0.5, 1.0, 2.0, 3.0]
    assert len(attempts) == 5
    message = str(error.value)
    assert "http://hub.example" in message and "5 attempts (4 retries" in message
    assert "ConnectError: connection refused" in message
    assert isinstance(error.value.__cause__, httpx2.ConnectError)


@pytest.mark.parametrize(
    "error, transient",
    [
        (httpx2.ConnectError("refused"), True),
        (httpx2.ReadTimeout("slow"), True),
        (httpx2.RemoteProtocolError("peer closed connection"), True),
        (httpx2.UnsupportedProtocol("htp://"), False),
        (OfflineModeIsEnabled("HF_HUB_OFFLINE=1"), False),
        (ValueError("bad argument"), False),
    ],
)
def test_only_network_failures_are_transient(error, transient):
    assert is_transient(error) is transient


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_are_never_retried(hub_server, status):
    hub_server.fail_next("whoami", status=status)
    api = huggingface_hub.HfApi()
    with pytest.raises(HfHubHTTPError):
        call_with_retries(
            api.whoami, description="whoami", endpoint=api.endpoint, sleep=lambda _: None
        )
    assert [request.status for request in hub_server.requests_of("whoami")] == [status]


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
def test_server_errors_are_retried(hub_server, status):
    hub_server.fail_next("whoami", times=2, status=status)
    api = huggingface_hub.HfApi()
    waits = []
    user = call_with_retries(
        api.whoami, description="whoami", endpoint=api.endpoint, sleep=waits.append
    )
    assert user["name"] == USER
    assert [request.status for request in hub_server.requests_of("whoami")] == [status, status, 200]
    assert waits == [1.0, 2.0]


def _in_seconds(seconds):
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
    return email.utils.format_datetime(moment, usegmt=True)


@pytest.mark.parametrize(
    "status, retry_after, expected_waits",
    [
        (429, "7", [7.0, 7.0]),
        (503, "0", [1.0, 2.0]),  # never sooner than the backoff
        (503, "45", [45.0, 45.0]),  # beyond max_delay: the Hub said so
        (429, lambda: _in_seconds(20), [20.0, 20.0]),  # an HTTP date, made when the test runs
    ],
    ids=["seconds", "zero", "beyond_max_delay", "http_date"],
)
def test_retries_wait_as_long_as_retry_after_asks(hub_server, status, retry_after, expected_waits):
    retry_after = retry_after() if callable(retry_after) else retry_after
    hub_server.fail_next("whoami", times=2, status=status, headers={"Retry-After": retry_after})
    api = huggingface_hub.HfApi()
    waits = []
    user = call_with_retries(
        api.whoami, description="whoami", endpoint=api.endpoint, sleep=waits.append
    )
    assert user["name"] == USER
    np.testing.assert_allclose(waits, expected_waits, atol=1.5)


def test_retries_outlast_a_server_restart_on_the_same_port(hub_server):
    port = hub_server.port
    api = huggingface_hub.HfApi()
    hub_server.stop()
    waits = []

    def restart_on_second_wait(seconds):
        waits.append(seconds)
        if len(waits) == 2:
            hub_server.start()

    user = call_with_retries(
        api.whoami, description="whoami", endpoint=api.endpoint, sleep=restart_on_second_wait
    )
    assert user["name"] == USER
    assert hub_server.port == port and len(waits) == 2


def test_publish_retries_server_errors_and_commits_once(hub_server, tmp_path):
    hub_server.fail_next("create_repo", times=1, status=502)
    hub_server.fail_next("commit", times=2, status=500)
    result = publish_preset(
        _write_preset(tmp_path / "preset"), HANDLE, model_card=_card(), **FAST_RETRIES
    )
    assert [request.status for request in hub_server.requests_of("commit")] == [500, 500, 200]
    assert [commit.commit_id for commit in hub_server.commits(REPO_ID)][0] == result.commit_id
    assert len(hub_server.commits(REPO_ID)) == 2


def test_publish_retries_dropped_connections_without_duplicating_the_commit(hub_server, tmp_path):
    hub_server.drop_next("create_repo", stage="before_processing")
    hub_server.drop_next("commit", stage="after_processing")  # the commit lands, its answer is lost
    result = publish_preset(
        _write_preset(tmp_path / "preset"), HANDLE, model_card=_card(), **FAST_RETRIES
    )
    assert [request.status for request in hub_server.requests_of("create_repo")] == [None, 200]
    assert [request.status for request in hub_server.requests_of("commit")] == [
        None
    ]  # retry: no-op
    history = hub_server.commits(REPO_ID)
    assert len(history) == 2 and history[0].commit_id == result.commit_id


def test_publish_reports_an_unreachable_hub_with_endpoint_and_retries(hub_server, tmp_path):
    preset = _write_preset(tmp_path / "preset")
    with hub_server.down(), pytest.raises(HubUnavailableError) as error:
        publish_preset(preset, HANDLE, model_card=_card(), **FAST_RETRIES)
    message = str(error.value)
    assert hub_server.url in message
    assert "4 attempts (3 retries with exponential backoff)" in message
    assert "ConnectError" in message
    assert not hub_server.repo_exists(REPO_ID)


def test_download_resumes_after_the_connection_drops_mid_file(hub_server, tmp_path):
    preset = _write_preset(tmp_path / "preset")
    publish_preset(preset, HANDLE, model_card=_card())
    hub_server.drop_next("download", stage="mid_body")
    assert (
        _download(REPO_ID, "assets/tokenizer/vocabulary.spm")
        == (preset / "assets/tokenizer/vocabulary.spm").read_bytes()
    )
    first, retry = hub_server.requests_of("download")
    assert first.status is None and retry.status in (200, 206)  # 206: resumed with a Range header


def test_server_serves_byte_ranges_like_the_hub(hub_server, tmp_path):
    preset = _write_preset(tmp_path / "preset")
    publish_preset(preset, HANDLE, model_card=_card())
    content = (preset / "config.json").read_bytes()
    url = huggingface_hub.hf_hub_url(REPO_ID, "config.json")
    session = huggingface_hub.get_session()
    partial = session.get(url, headers={"Range": "bytes=10-19"})
    assert partial.status_code == 206 and partial.content == content[10:20]
    assert partial.headers["Content-Range"] == f"bytes 10-19/{len(content)}"
    assert session.get(url, headers={"Range": "bytes=10-"}).content == content[10:]
    assert session.get(url, headers={"Range": f"bytes={len(content)}-"}).status_code == 416
    head = session.head(url)
    assert int(head.headers["Content-Length"]) == len(content) and not head.content
    assert head.headers["ETag"].strip('"') == git_blob_id(content)


# ------------------------------------------------------------------------------------------------
# Offline loading from the cache.


def test_offline_download_from_a_hand_built_cache(hub_server, monkeypatch):
    files = {
        "config.json": b'{"registered_name": "keras_glam>GLaMBackbone"}',
        "assets/tokenizer/v.spm": b"spm",
    }
    commit_id = build_hub_cache(constants.HF_HUB_CACHE, "glam-org/offline", files)
    refs_main = pathlib.Path(constants.HF_HUB_CACHE) / "models--glam-org--offline" / "refs" / "main"
    assert refs_main.read_bytes() == commit_id.encode()  # no trailing newline
    set_hub_offline(monkeypatch)

    for path, content in files.items():
        assert _download("glam-org/offline", path) == content
        assert _download("glam-org/offline", path, revision=commit_id) == content
    assert (
        preset_utils.load_json("hf://glam-org/offline")["registered_name"]
        == "keras_glam>GLaMBackbone"
    )
    with pytest.raises(LocalEntryNotFoundError):
        huggingface_hub.hf_hub_download("glam-org/offline", "model.weights.h5")
    assert not hub_server.requests


def test_offline_download_after_an_online_one(hub_server, tmp_path, monkeypatch):
    preset = _write_preset(tmp_path / "preset")
    publish_preset(preset, HANDLE, model_card=_card())
    online = _download(REPO_ID, "config.json")
    set_hub_offline(monkeypatch)
    hub_server.stop()
    assert _download(REPO_ID, "config.json") == online == (preset / "config.json").read_bytes()
