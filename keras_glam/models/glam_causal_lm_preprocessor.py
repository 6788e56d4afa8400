"""Preprocessing for GLaM causal language modelling."""

import keras
import keras_hub

from keras_glam.models import preset_loading
from keras_glam.models.glam_backbone import GLaMBackbone
from keras_glam.models.glam_tokenizer import GLaMTokenizer


@keras.saving.register_keras_serializable(package="keras_glam")
class GLaMCausalLMPreprocessor(keras_hub.models.CausalLMPreprocessor):
    """Turns strings into `(x, y, sample_weight)` for `GLaMCausalLM`, and prompts for `generate`.

    Args:
        tokenizer: a `GLaMTokenizer`.
        sequence_length: length of the packed token sequences.
        add_start_token: prepend `<s>`.
        add_end_token: append `</s>`.

    Example:
    ```python
    preprocessor = keras_glam.GLaMCausalLMPreprocessor.from_preset(
        "glam_small_16e", sequence_length=16)
    x, y, sample_weight = preprocessor(["print('hello')"])
    ```
    """

    backbone_cls = GLaMBackbone
    tokenizer_cls = GLaMTokenizer

    @preset_loading.classproperty
    def presets(cls):
        return preset_loading.preset_metadata()

    @classmethod
    def from_preset(cls, preset, revision=None, **kwargs):
        """The preprocessor of a builtin preset, a preset directory or an `hf://` handle."""
        if preset_loading.builtin_backbone_config(preset) is not None:
            return cls(tokenizer=GLaMTokenizer.from_preset(preset), **kwargs)
        preset = preset_loading.resolve_handle(preset, revision)
        return super().from_preset(preset, **kwargs)
