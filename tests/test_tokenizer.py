import numpy as np

import keras_glam
from keras_glam.data.embedded_corpus import pydoc_documents


def test_shipped_vocabulary_round_trips_python_docs_exactly():
    tokenizer = keras_glam.GLaMTokenizer.from_preset("glam_small_16e")
    text = pydoc_documents()[0][:2000]
    ids = tokenizer(text)
    assert tokenizer.detokenize(ids) == text


def test_special_tokens():
    tokenizer = keras_glam.GLaMTokenizer.from_preset("glam_small_16e")
    assert tokenizer.pad_token_id == 0
    assert tokenizer.end_token_id == 1
    assert tokenizer.start_token_id == 2
    assert tokenizer.vocabulary_size() == 4096


def test_preprocessor_shifts_labels_and_masks_padding():
    preprocessor = keras_glam.GLaMCausalLMPreprocessor.from_preset(
        "glam_small_16e", sequence_length=8
    )
    x, y, sample_weight = preprocessor(["a"])
    ids = np.asarray(x["token_ids"])[0]
    assert ids[0] == 2  # <s>
    np.testing.assert_array_equal(np.asarray(y)[0, :-1], ids[1:])
    mask = np.asarray(x["padding_mask"])[0]
    np.testing.assert_array_equal(np.asarray(sample_weight)[0][: mask.sum() - 1], 1)
