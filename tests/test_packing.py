"""The packed causal-LM input pipeline: packing, segments, labels, mixtures, sharding, errors."""

import collections
import io

import keras_hub
import numpy as np
import pytest
import sentencepiece
import tensorflow as tf

from keras_glam.data import causal_lm_example
from keras_glam.data import document_dataset
from keras_glam.data import pack_documents
from keras_glam.data import packed_lm_dataset
from keras_glam.data import text_files

# ByteTokenizer ids are bytes 0-255, so 256 and 257 are unambiguous as end and start tokens.
END = 256
START = 257
BYTES = keras_hub.tokenizers.ByteTokenizer(lowercase=False)


def _documents(count=40, seed=0, longest=40):
    """Distinct documents of 0 to `longest` characters (one empty)."""
    rng = np.random.default_rng(seed)
    documents = []
    for index in range(count):
        length = int(rng.integers(0, longest))
        body = "".join(rng.choice(list("abcdefgh xyz"), size=length))
        documents.append(f"{index}:{body}" if index != 5 else "")
    return documents


def _byte_stream(documents):
    """The expected token stream: each non-empty document as START, its UTF-8 bytes, END."""
    stream = []
    for document in documents:
        if document:
            stream += [START] + list(document.encode("utf-8")) + [END]
    return stream


def _rows(dataset):
    """Stacks every batch of a packed_lm_dataset into [rows, L] arrays."""
    batches = list(dataset.as_numpy_iterator())
    token_ids = np.concatenate([x["token_ids"] for x, _, _ in batches])
    segment_ids = np.concatenate([x["padding_mask"] for x, _, _ in batches])
    labels = np.concatenate([y for _, y, _ in batches])
    sample_weight = np.concatenate([w for _, _, w in batches])
    return token_ids, segment_ids, labels, sample_weight


def _unpack(token_ids, segment_ids):
    return token_ids[segment_ids != 0].tolist()


def _split_documents(stream):
    documents, current = [], []
    for token in stream:
        current.append(token)
        if token == END:
            assert current[0] == START, "every document starts with the start token"
            documents.append(bytes(current[1:-1]).decode("utf-8"))
            current = []
    assert not current, "the stream must end with the end token"
    return documents


def _packed(sources, **kwargs):
    options = dict(
        sequence_length=16,
        batch_size=4,
        end_token_id=END,
        start_token_id=START,
        shuffle_buffer=0,
        drop_remainder=False,
    )
    options.update(kwargs)
    return packed_lm_dataset(sources, BYTES, **options)


def test_unpacking_recovers_every_token_once_in_order():
    documents = _documents()
    documents[7] = "long:" + "q" * 50  # longer than three rows of 16: split across rows
    token_ids, segment_ids, _, _ = _rows(_packed(documents))
    expected = _byte_stream(documents)
    assert _unpack(token_ids, segment_ids) == expected
    assert token_ids.shape == (-(-len(expected) // 16), 16)
    # Only the last row is padded, and padding (segment 0, token 0) sits at its end.
    real = segment_ids != 0
    assert real[:-1].all()
    assert np.all(np.diff(real[-1].astype(int)) <= 0)
    assert np.all(token_ids[~real] == 0)


def test_segment_ids_start_at_one_and_step_after_each_end_token():
    token_ids, segment_ids, _, _ = _rows(_packed(_documents(seed=1)))
    for tokens, segments in zip(token_ids, segment_ids):
        real = segments != 0
        assert segments[0] == 1  # also when the row starts mid-document
        for i in range(1, int(real.sum())):
            assert segments[i] == segments[i - 1] + (tokens[i - 1] == END)
            # A document that starts in this row starts with the start token.
            assert (segments[i] != segments[i - 1]) == (tokens[i] == START)


def test_labels_and_sample_weights():
    token_ids, segment_ids, labels, sample_weight = _rows(_packed(_documents(seed=2)))
    length = token_ids.shape[1]
    real = segment_ids != 0
    # A label counts iff its position holds a real token other than the end token and the
    # next position is in the same row.
    expected_weight = real & (token_ids != END)
    expected_weight[:, length - 1] = False
    np.testing.assert_array_equal(sample_weight, expected_weight.astype("float32"))
    np.testing.assert_array_equal(labels[:, :-1], token_ids[:, 1:])
    # The last real token of every document is trained to predict the end token.
    before_end = np.roll(token_ids == END, -1, axis=1) & expected_weight
    assert before_end.sum() > 10
    assert np.all(labels[before_end] == END)
    # The start token predicts the document's first real token, and is never a label itself.
    at_start = (token_ids == START) & expected_weight
    assert at_start.sum() > 10
    assert not np.isin(labels[at_start], [START, END]).any()
    assert not np.any(labels[sample_weight > 0] == START)


def test_batch_remainder():
    documents = _documents(seed=3)
    num_rows = -(-len(_byte_stream(documents)) // 16)
    kept, _, _, _ = _rows(_packed(documents, batch_size=4, drop_remainder=False))
    dropped, _, _, _ = _rows(_packed(documents, batch_size=4, drop_remainder=True))
    assert kept.shape[0] == num_rows
    assert dropped.shape[0] == num_rows // 4 * 4
    batch_shapes = [x["token_ids"].shape for x, _, _ in _packed(documents, drop_remainder=True)]
    assert all(shape == (4, 16) for shape in batch_shapes)


def test_causal_lm_example_on_a_worked_row():
    rows = {
        "token_ids": tf.constant([[5, 6, END, 7, END, 0], [8, 9, 4, 3, 2, 1]]),
        "segment_ids": tf.constant([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]]),
    }
    x, labels, sample_weight = causal_lm_example(rows)
    np.testing.assert_array_equal(x["padding_mask"], rows["segment_ids"])
    np.testing.assert_array_equal(labels, [[6, END, 7, END, 0, 0], [9, 4, 3, 2, 1, 0]])
    np.testing.assert_array_equal(sample_weight, [[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 0]])


def test_hand_worked_packing_with_start_tokens():
    # The stream is S a b E S c E S d e f g E (S = START, E = END), cut into rows of 6.
    a, b, c, d, e, f, g = b"abcdefg"
    rows = list(
        pack_documents(
            ["ab", "c", "", "defg"],
            BYTES,
            sequence_length=6,
            end_token_id=END,
            start_token_id=START,
        ).as_numpy_iterator()
    )
    token_ids = np.stack([row["token_ids"] for row in rows])
    segment_ids = np.stack([row["segment_ids"] for row in rows])
    S, E = START, END
    np.testing.assert_array_equal(
        token_ids, [[S, a, b, E, S, c], [E, S, d, e, f, g], [E, 0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        segment_ids, [[1, 1, 1, 1, 2, 2], [1, 2, 2, 2, 2, 2], [1, 0, 0, 0, 0, 0]]
    )
    x, labels, sample_weight = causal_lm_example(
        {"token_ids": token_ids, "segment_ids": segment_ids}
    )
    np.testing.assert_array_equal(x["padding_mask"], segment_ids)
    np.testing.assert_array_equal(
        labels, [[a, b, E, S, c, 0], [S, d, e, f, g, 0], [0, 0, 0, 0, 0, 0]]
    )
    # S predicts each document's first real token (a, c, d); E -> S crosses a document
    # boundary and weighs 0, so S is never a label; a row's last position has no successor.
    np.testing.assert_array_equal(
        sample_weight, [[1, 1, 1, 0, 1, 0], [0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]]
    )


def test_add_start_token_false_packs_documents_without_it():
    rows = list(
        pack_documents(
            ["ab", "c"], BYTES, sequence_length=6, end_token_id=END, add_start_token=False
        ).as_numpy_iterator()
    )
    assert rows[0]["token_ids"].tolist() == [*b"ab", END, *b"c", END, 0]
    assert rows[0]["segment_ids"].tolist() == [1, 1, 1, 2, 2, 0]


def _sentencepiece_tokenizer():
    sentences = [
        "the cat sat on the mat",
        "a dog ran far away from home",
        "hello world, again and again",
        "packing documents into rows",
    ]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * 4),
        model_writer=model,
        vocab_size=40,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        bos_id=3,
        unk_id=2,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return keras_hub.tokenizers.SentencePieceTokenizer(proto=model.getvalue())


def test_sentencepiece_tokenizer_in_graph():
    tokenizer = _sentencepiece_tokenizer()
    documents = ["the cat sat", "   ", "a dog ran home", "hello again and again and again"]
    rows = list(
        pack_documents(documents, tokenizer, sequence_length=8, end_token_id=1, start_token_id=3)
    )
    stream = []
    for row in rows:
        stream += row["token_ids"].numpy()[row["segment_ids"].numpy() != 0].tolist()
    expected = []
    for document in documents:
        ids = np.asarray(tokenizer(document)).tolist()
        if ids:  # whitespace tokenises to nothing and is dropped
            expected += [3] + ids + [1]
    assert stream == expected


def test_shuffle_keeps_every_token_once_and_is_deterministic():
    documents = _documents(seed=4)
    options = dict(sequence_length=64, shuffle_buffer=8)
    first = _rows(_packed(documents, seed=3, **options))
    again = _rows(_packed(documents, seed=3, **options))
    other = _rows(_packed(documents, seed=4, **options))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])

    token_ids, segment_ids = first[0], first[1]
    expected = _byte_stream(documents)
    assert collections.Counter(_unpack(token_ids, segment_ids)) == collections.Counter(expected)
    # Rows are shuffled too, so a document split across rows is no longer contiguous; but a
    # segment other than a row's first starts a document, and one ending in END is whole.
    whole_documents = []
    for tokens, segments in zip(token_ids, segment_ids):
        for segment in range(2, segments.max() + 1):
            segment_tokens = tokens[segments == segment].tolist()
            if segment_tokens[-1] == END:
                whole_documents += _split_documents(segment_tokens)
    assert len(whole_documents) >= len(documents) // 4
    assert len(set(whole_documents)) == len(whole_documents)
    assert set(whole_documents) <= set(documents)
    positions = [documents.index(document) for document in whole_documents]
    assert positions != sorted(positions)


GLAM_MIXTURE = [0.42, 0.06, 0.28, 0.02, 0.20, 0.02]


def test_mixture_follows_glam_weights():
    rng = np.random.default_rng(5)
    letters = "abcdef"
    sources = [
        [letter * int(rng.integers(1, 30)) for _ in range(50)] for letter in letters
    ]
    dataset = _packed(sources, weights=GLAM_MIXTURE, batch_size=100, seed=7, repeat=True)
    token_ids, segment_ids, _, _ = _rows(dataset.take(30))
    num_rows = token_ids.shape[0]
    counts = np.zeros(len(letters))
    for tokens, segments in zip(token_ids, segment_ids):
        letters_in_row = set(tokens[segments != 0].tolist()) - {START, END}
        assert len(letters_in_row) == 1  # rows are mixed, documents are not
        counts[letters.index(chr(letters_in_row.pop()))] += 1
    weights = np.array(GLAM_MIXTURE)
    tolerance = 4 * np.sqrt(weights * (1 - weights) / num_rows)
    assert np.all(np.abs(counts / num_rows - weights) < tolerance), counts / num_rows


def test_mixture_is_deterministic_given_a_seed():
    sources = [["aaa", "aa", "a"], ["bbbb", "b"]]
    runs = [
        _rows(_packed(sources, weights=[1, 3], shuffle_buffer=4, seed=11, repeat=True).take(5))
        for _ in range(2)
    ]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])


def test_sharding_partitions_documents():
    documents = _documents(count=30, seed=6)
    shards = []
    for index in range(3):
        token_ids, segment_ids, _, _ = _rows(_packed(documents, num_shards=3, shard_index=index))
        shards.append(_split_documents(_unpack(token_ids, segment_ids)))
    for index, shard in enumerate(shards):
        assert shard == [d for d in documents[index::3] if d]
    assert sorted(sum(shards, [])) == sorted(d for d in documents if d)


def test_skip_batches_resumes_the_stream():
    documents = _documents(count=60, seed=7)
    full = list(_packed(documents, shuffle_buffer=16, seed=5, batch_size=2).as_numpy_iterator())
    resumed = list(
        _packed(documents, shuffle_buffer=16, seed=5, batch_size=2, skip_batches=3)
        .as_numpy_iterator()
    )
    assert len(resumed) == len(full) - 3
    for (x, y, w), (x_full, y_full, w_full) in zip(resumed, full[3:]):
        np.testing.assert_array_equal(x["token_ids"], x_full["token_ids"])
        np.testing.assert_array_equal(w, w_full)


def test_generator_source_streams_once():
    documents = _documents(seed=8)
    token_ids, segment_ids, _, _ = _rows(_packed(iter(documents)))
    assert _unpack(token_ids, segment_ids) == _byte_stream(documents)


def test_dataset_source():
    documents = _documents(seed=9)
    token_ids, segment_ids, _, _ = _rows(_packed(tf.data.Dataset.from_tensor_slices(documents)))
    assert _unpack(token_ids, segment_ids) == _byte_stream(documents)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_text_files_document_boundaries(tmp_path):
    _write(tmp_path / "b.txt", "Para one\nline two\n\n\n  \nPara two\n\nlast, no newline")
    _write(tmp_path / "a.txt", "\nFirst file.\n")
    pattern = str(tmp_path / "*.txt")

    def read(boundary):
        return [d.decode() for d in text_files(pattern, boundary).as_numpy_iterator()]

    assert read("blank_line") == [
        "First file.",
        "Para one\nline two",
        "Para two",
        "last, no newline",
    ]
    assert read("line") == ["First file.", "Para one", "line two", "Para two", "last, no newline"]
    assert read("file") == [
        "\nFirst file.\n",
        "Para one\nline two\n\n\n  \nPara two\n\nlast, no newline",
    ]
    token_ids, segment_ids, _, _ = _rows(_packed(text_files(pattern)))
    assert _split_documents(_unpack(token_ids, segment_ids)) == read("blank_line")


def test_text_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No file matches"):
        text_files(str(tmp_path / "missing*.txt"))
    with pytest.raises(ValueError, match="document_boundary"):
        text_files(_write(tmp_path / "a.txt", "x"), document_boundary="sentence")
    with pytest.raises(ValueError, match="paths"):
        text_files([])


def _empty_generator():
    yield from ()


@pytest.mark.parametrize(
    "sources, kwargs, error, message",
    [
        ([], {}, ValueError, "The corpus has no document"),
        (["", ""], {}, ValueError, "The corpus has no document"),
        (_empty_generator(), {}, ValueError, "The corpus is empty"),
        ([["a"], []], {}, ValueError, "Source 1 of the mixture has no document"),
        (["only one"], {"num_shards": 2, "shard_index": 1}, ValueError, r"shard 1 of 2"),
        ([["a"], ["b"]], {"weights": [0.5, -0.5]}, ValueError, "non-negative"),
        ([["a"], ["b"]], {"weights": [0.0, 0.0]}, ValueError, "positive sum"),
        ([["a"], ["b"]], {"weights": [1.0]}, ValueError, "1 mixture weights for 2 sources"),
        (["a"], {"sequence_length": 1}, ValueError, "sequence_length"),
        (["a"], {"sequence_length": 8.0}, ValueError, "sequence_length"),
        (["a"], {"batch_size": 0}, ValueError, "batch_size"),
        (["a"], {"num_shards": 2, "shard_index": 2}, ValueError, "shard_index"),
        (["a"], {"skip_batches": -1}, ValueError, "skip_batches"),
        (["a"], {"skip_batches": 2, "shuffle_buffer": 4}, ValueError, "pass a `seed`"),
        (iter(["a"]), {"repeat": True}, ValueError, "cannot be repeated"),
        ("a document", {}, TypeError, "single string"),
        (42, {}, TypeError, "iterable"),
        (tf.data.Dataset.range(3), {}, TypeError, "scalar tf.string"),
        ([["a"], [1, 2]], {}, TypeError, "Documents must be `str`"),
    ],
)
def test_errors(sources, kwargs, error, message):
    with pytest.raises(error, match=message):
        _packed(sources, **kwargs)


def test_missing_end_token_id():
    with pytest.raises(ValueError, match="pass `end_token_id=`"):
        packed_lm_dataset(["a"], lambda text: tf.strings.unicode_decode(text, "UTF-8"))


def test_missing_start_token_id():
    with pytest.raises(ValueError, match="pass `start_token_id=`.*or `add_start_token=False`"):
        packed_lm_dataset(["a"], BYTES, end_token_id=END)
    with pytest.raises(ValueError, match="`start_token_id` must be a non-negative integer"):
        pack_documents(["a"], BYTES, end_token_id=END, start_token_id=-1)


def test_non_vector_tokenizer_output():
    with pytest.raises(ValueError, match="1-D tensor"):
        packed_lm_dataset(
            ["a"], lambda text: tf.zeros([2, 2], tf.int32), end_token_id=0, start_token_id=1
        )


def test_document_dataset_rereads_lists():
    dataset = document_dataset(["x", "y"])
    assert list(dataset.as_numpy_iterator()) == list(dataset.as_numpy_iterator()) == [b"x", b"y"]
