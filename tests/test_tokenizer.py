import numpy as np
import pytest

import keras_glam
from keras_glam.data import causal_lm_example
from keras_glam.data import pack_documents
from keras_glam.data.embedded_corpus import pydoc_documents
from keras_glam.models.glam_tokenizer import frame_document


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


DOCUMENT = 'print("Hello, world")'


def _document_as_packed_and_as_prompt():
    """The shipped preprocessor, `DOCUMENT` framed, the packed row holding it (another
    document after it) and its `generate` input."""
    preprocessor = keras_glam.GLaMCausalLMPreprocessor.from_preset(
        "glam_small_16e", sequence_length=32
    )
    tokenizer = preprocessor.tokenizer
    ids = np.asarray(tokenizer(DOCUMENT)).tolist()
    framed = frame_document(ids, tokenizer.start_token_id, tokenizer.end_token_id)
    rows = pack_documents([DOCUMENT, "Another document."], tokenizer, sequence_length=64)
    prompt = preprocessor.generate_preprocess([DOCUMENT])
    prompt = {name: np.asarray(value)[0] for name, value in prompt.items()}
    return preprocessor, np.asarray(framed).tolist(), next(rows.as_numpy_iterator()), prompt


def test_training_generation_and_scoring_frame_a_document_alike():
    preprocessor, framed, row, prompt = _document_as_packed_and_as_prompt()
    tokenizer = preprocessor.tokenizer
    ids = np.asarray(tokenizer(DOCUMENT)).tolist()
    assert framed == [tokenizer.start_token_id, *ids, tokenizer.end_token_id]
    length = len(framed)

    # Training: the packed row holds the framed document as its first segment.
    assert row["token_ids"][row["segment_ids"] == 1].tolist() == framed
    _, packed_labels, packed_weight = causal_lm_example(row)
    packed_labels, packed_weight = np.asarray(packed_labels), np.asarray(packed_weight)
    # `<s>` predicts the first real token; every real token's label counts, `<s>` is none.
    assert packed_labels[0] == ids[0]
    np.testing.assert_array_equal(packed_weight[: length - 1], 1)
    np.testing.assert_array_equal(packed_labels[: length - 1], framed[1:])

    # Generation (and a scoring context): the same document, without its end.
    prompt_mask = prompt["padding_mask"].astype(bool)
    assert prompt["token_ids"][prompt_mask].tolist() == framed[:-1]
    assert prompt_mask[: length - 1].all()

    # Training on raw strings through the preprocessor: the same ids, labels and weights.
    x, labels, weight = preprocessor([DOCUMENT])
    assert np.asarray(x["token_ids"])[0, :length].tolist() == framed
    np.testing.assert_array_equal(np.asarray(labels)[0, : length - 1], framed[1:])
    np.testing.assert_array_equal(np.asarray(weight)[0, :length], packed_weight[:length])


@pytest.mark.slow
def test_the_model_computes_a_packed_document_as_its_prompt():
    preprocessor, framed, row, prompt = _document_as_packed_and_as_prompt()
    backbone = keras_glam.GLaMBackbone(
        vocabulary_size=preprocessor.tokenizer.vocabulary_size(),
        num_layers=1,
        hidden_dim=8,
        intermediate_dim=8,
        num_heads=1,
        head_dim=8,
    )
    packed = backbone(
        {"token_ids": row["token_ids"][None], "padding_mask": row["segment_ids"][None]}
    )
    prompted = backbone(
        {"token_ids": prompt["token_ids"][None], "padding_mask": prompt["padding_mask"][None]}
    )
    prompt_length = len(framed) - 1
    np.testing.assert_allclose(
        np.asarray(packed)[0, :prompt_length],
        np.asarray(prompted)[0, :prompt_length],
        rtol=1e-5,
        atol=1e-6,
    )
