"""GLaM presets through the Hub: publish with our card, load with `from_preset("hf://...")`."""

import huggingface_hub
import keras_hub
import numpy as np
import pytest
from hub_server import WRITABLE_ORG
from hub_server import set_hub_offline
from huggingface_hub import CommitOperationAdd

import keras_glam
from keras_glam.hub import publish_preset
from keras_glam.hub import render_model_card


def _publish(lm, directory, handle, message):
    lm.save_to_preset(directory)
    total, activated = keras_glam.count_params(lm.backbone.get_config())
    card = render_model_card(
        handle,
        backbone_config=lm.backbone.get_config(),
        total_params=total,
        activated_params=activated,
    )
    return publish_preset(directory, handle, model_card=card, commit_message=message)


def _inputs():
    ids = np.array([[2, 50, 51, 52, 0, 0]], "int32")
    return {"token_ids": ids, "padding_mask": ids != 0}


@pytest.mark.slow
def test_publish_then_load_from_hf_handle_and_revision(hub_server, tmp_path, monkeypatch):
    handle = f"hf://{WRITABLE_ORG}/glam-tiny"
    first = keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e")
    _publish(first, tmp_path / "v1", handle, "first")
    # Training checkpoints next to the preset (as `HubCheckpoint` pushes them): loading this
    # revision must not download them.
    first_commit = (
        huggingface_hub.HfApi()
        .create_commit(
            f"{WRITABLE_ORG}/glam-tiny",
            operations=[
                CommitOperationAdd(f"checkpoints/ckpt-000001-step-000000002/{name}", b"state")
                for name in ("optimizer.npz", "model.weights.h5", "state.json")
            ],
            commit_message="a training checkpoint",
        )
        .oid
    )
    second = keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e")  # new random weights
    _publish(second, tmp_path / "v2", handle, "second")

    loaded = keras_glam.GLaMCausalLM.from_preset(handle)
    np.testing.assert_array_equal(np.asarray(loaded(_inputs())), np.asarray(second(_inputs())))

    # keras-hub's generic entry point resolves to our class.
    generic = keras_hub.models.CausalLM.from_preset(handle)
    assert type(generic) is keras_glam.GLaMCausalLM

    for older in [
        keras_glam.GLaMCausalLM.from_preset(handle, revision=first_commit),
        keras_glam.GLaMCausalLM.from_preset(f"{handle}@{first_commit}"),
    ]:
        np.testing.assert_array_equal(np.asarray(older(_inputs())), np.asarray(first(_inputs())))
    downloaded = [request.path for request in hub_server.requests_of("download")]
    assert any(f"/resolve/{first_commit}/model.weights.h5" in path for path in downloaded)
    assert not [path for path in downloaded if "/checkpoints/" in path]

    # Offline, from the cache the downloads filled.
    set_hub_offline(monkeypatch, offline=True)
    hub_server.down()
    offline = keras_glam.GLaMCausalLM.from_preset(handle)
    np.testing.assert_array_equal(np.asarray(offline(_inputs())), np.asarray(second(_inputs())))
