"""GLaM on the Hugging Face Hub: publishing presets, and training checkpoints synced while training.

Publishing: upload, model card, tokens, retries (`publish_model`, `publish_preset`). Downloads
need nothing from here: `GLaMCausalLM.from_preset("hf://namespace/name")` goes through keras-hub
and `huggingface_hub.hf_hub_download`. Training checkpoints: the `HubCheckpoint` callback
(`checkpoint_callback`, also `keras_glam.callbacks.HubCheckpoint`), built on `checkpoint_sync`.
"""

from keras_glam.hub.auth import HubAuthError
from keras_glam.hub.auth import WriteAccess
from keras_glam.hub.auth import check_write_access
from keras_glam.hub.auth import parse_hf_handle
from keras_glam.hub.auth import resolve_token
from keras_glam.hub.checkpoint_callback import HubCheckpoint
from keras_glam.hub.checkpoint_sync import PushedCheckpoint
from keras_glam.hub.checkpoint_sync import RemoteCheckpointError
from keras_glam.hub.checkpoint_sync import pull_latest_checkpoint
from keras_glam.hub.model_card import find_loss_plot
from keras_glam.hub.model_card import render_model_card
from keras_glam.hub.publish import PresetValidationError
from keras_glam.hub.publish import PublishResult
from keras_glam.hub.publish import publish_preset
from keras_glam.hub.publish import validate_preset_dir
from keras_glam.hub.publish_model import publish_model
from keras_glam.hub.retry import HubUnavailableError
from keras_glam.hub.retry import call_with_retries

__all__ = [
    "HubAuthError",
    "HubCheckpoint",
    "HubUnavailableError",
    "PresetValidationError",
    "PublishResult",
    "PushedCheckpoint",
    "RemoteCheckpointError",
    "WriteAccess",
    "call_with_retries",
    "check_write_access",
    "find_loss_plot",
    "parse_hf_handle",
    "publish_model",
    "publish_preset",
    "pull_latest_checkpoint",
    "render_model_card",
    "resolve_token",
    "validate_preset_dir",
]
