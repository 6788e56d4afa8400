"""Preprocessing for GLaM causal language modelling."""

import keras
import keras_hub

from keras_glam.models.glam_backbone import GLaMBackbone
from keras_glam.models.glam_tokenizer import GLaMTokenizer
from keras_glam.models.presets import GLaMPresets


@keras.saving.register_keras_serializable(package="keras_glam")
class GLaMCausalLMPreprocessor(GLaMPresets, keras_hub.models.CausalLMPreprocessor):
    """Turns strings into `(x, y, sample_weight)` for `GLaMCausalLM`, and prompts for `generate`.

    With the defaults a text is framed as every path frames a document
    (`keras_glam.models.glam_tokenizer.frame_document`): `<s> text </s>` for training, and a
    `generate` prompt `<s> text`, so the model continues a document as packed training rows
    (`keras_glam.data.pack_documents`) showed it documents.

    Args:
        tokenizer: a `GLaMTokenizer`.
        sequence_length: int, length of the padded token sequences. Defaults to 1024.
        add_start_token: bool, prepend `<s>` (GLaM's convention). Defaults to `True`.
        add_end_token: bool, append `</s>` to training texts (never to `generate` prompts).
            Defaults to `True`.

    Example:
    ```python
    preprocessor = keras_glam.GLaMCausalLMPreprocessor.from_preset(
        "glam_small_16e", sequence_length=16)
    x, y, sample_weight = preprocessor(["print('hello')"])
    ```
    """

    backbone_cls = GLaMBackbone
    tokenizer_cls = GLaMTokenizer
