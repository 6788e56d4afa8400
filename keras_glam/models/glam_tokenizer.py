"""GLaM's SentencePiece tokenizer, and the one way every path frames a document with it."""

import keras
import keras_hub

from keras_glam.models.glam_backbone import GLaMBackbone
from keras_glam.models.presets import GLaMPresets

START_TOKEN = "<s>"
END_TOKEN = "</s>"
PAD_TOKEN = "<pad>"


def frame_document(token_ids, start_token_id, end_token_id=None):
    """A document's token ids as the model sees them: `<s>`, the text's ids, then `</s>`.

    GLaM's document convention, the same in every path (as Lingvo's LM inputs, where a
    document's ids are `<s> t1 .. tn` and its labels `t1 .. tn </s>`):

    - Training (`keras_glam.data.pack_documents`, `packed_lm_dataset`): each packed document
      is `<s> t1 .. tn </s>`, one segment. A position's label is the next token of the same
      segment, so `<s>`'s label is `t1` (the first real token is a label), `tn`'s is `</s>`,
      and no label crosses a document boundary: `<s>` is never a label. The `</s>` position
      has no label; the other positions' predictions and labels are Lingvo's exactly.
    - Training on raw strings (`GLaMCausalLMPreprocessor(...)(texts)`, `add_start_token` and
      `add_end_token` True): the same framing, one document per row.
    - Generation (`GLaMCausalLMPreprocessor.generate_preprocess`, `add_start_token=True`):
      a prompt is `<s> t1 .. tk`, without `</s>`, and the model continues the document.
    - Scoring (evaluation): a continuation's log-likelihood conditions on `<s>` and the
      context: the ids are `frame_document(context_ids + continuation_ids, start_token_id)`
      and the continuation's tokens are the labels.

    Runs in TensorFlow (eagerly, or inside `tf.data`), like tokenisation.

    Args:
        token_ids: 1-D integer tensor, array or list: a text's ids, without special tokens.
        start_token_id: int, the id of `<s>` (`tokenizer.start_token_id`), or `None` to
            leave it out (not GLaM's convention).
        end_token_id: int, the id of `</s>` (`tokenizer.end_token_id`) ending a whole
            document; `None` (default) for a prefix: a prompt or a scoring context.

    Returns:
        A 1-D int32 `tf.Tensor`.

    Example:

    >>> frame_document([17, 42], start_token_id=2, end_token_id=1).numpy().tolist()
    [2, 17, 42, 1]
    >>> frame_document([17, 42], start_token_id=2).numpy().tolist()  # a prompt
    [2, 17, 42]
    """
    import tensorflow as tf  # Tokenisation runs in TensorFlow; the model never calls this.

    parts = [tf.cast(token_ids, tf.int32)]
    if start_token_id is not None:
        parts.insert(0, tf.constant([start_token_id], tf.int32))
    if end_token_id is not None:
        parts.append(tf.constant([end_token_id], tf.int32))
    return tf.concat(parts, axis=0)


@keras.saving.register_keras_serializable(package="keras_glam")
class GLaMTokenizer(GLaMPresets, keras_hub.tokenizers.SentencePieceTokenizer):
    """SentencePiece tokenizer with GLaM's special tokens.

    The vocabulary must hold `<pad>` (padding), `<s>` (start) and `</s>` (end of document);
    `keras_glam.data.train_vocabulary` trains one with ids 0, 2 and 1 for them. Every path
    frames a document as `<s> text </s>` (`frame_document`). Tokenisation runs
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
        self._add_special_token(START_TOKEN, "start_token")
        self._add_special_token(END_TOKEN, "end_token")
        self._add_special_token(PAD_TOKEN, "pad_token")
        super().__init__(proto=proto, **kwargs)
