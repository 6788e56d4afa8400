"""GLaM's SentencePiece tokenizer."""

import keras
import keras_hub

from keras_glam.models import preset_loading
from keras_glam.models.glam_backbone import GLaMBackbone


@keras.saving.register_keras_serializable(package="keras_glam")
class GLaMTokenizer(keras_hub.tokenizers.SentencePieceTokenizer):
    """SentencePiece tokenizer with GLaM's special tokens.

    The vocabulary must hold `<pad>` (padding), `<s>` (start) and `</s>` (end of document);
    `keras_glam.data.train_vocabulary` trains one with ids 0, 2 and 1 for them. Tokenisation runs
    in TensorFlow (tensorflow-text), so it fits into `tf.data` pipelines; the model itself does
    not need TensorFlow.

    Args:
        proto: path to a SentencePiece model file, or its serialized bytes.

    Example:
    ```python
    tokenizer = keras_glam.GLaMTokenizer.from_preset("glam_small_16e")
    ids = tokenizer("def f(x): return x")
    tokenizer.detokenize(ids)
    ```
    """

    backbone_cls = GLaMBackbone

    def __init__(self, proto, **kwargs):
        self._add_special_token("<s>", "start_token")
        self._add_special_token("</s>", "end_token")
        self._add_special_token("<pad>", "pad_token")
        super().__init__(proto=proto, **kwargs)

    @preset_loading.classproperty
    def presets(cls):
        return preset_loading.preset_metadata()

    @classmethod
    def from_preset(cls, preset, revision=None, **kwargs):
        """The tokenizer of a builtin preset, a preset directory or an `hf://` handle."""
        if preset_loading.builtin_backbone_config(preset) is not None:
            path = preset_loading.builtin_vocabulary_path(preset)
            if path is None:
                raise preset_loading.no_tokenizer_error(preset)
            return cls(proto=path, **kwargs)
        preset = preset_loading.resolve_handle(preset, revision)
        return super().from_preset(preset, **kwargs)
