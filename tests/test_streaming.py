"""The streaming training input: specs, mixtures, held-out split, baseline, exact resume."""

import collections
import doctest
import json

import numpy as np
import pytest
import tensorflow as tf

from keras_glam.data import sources
from keras_glam.data import streaming
from keras_glam.data.sources import DataError
from keras_glam.data.streaming import DataSpec
from keras_glam.data.streaming import StreamingData
from keras_glam.models.glam_tokenizer import GLaMTokenizer


@pytest.fixture
def tokenizer():
    # Per test: the seeding before each test (conftest) drops TensorFlow's tokenizer resources.
    return GLaMTokenizer.from_preset("glam_tiny_8e")


def _documents(prefix, count):
    return [f"{prefix} document {i} says {'words ' * (i % 7 + 1)}." for i in range(count)]


def _flat(batch):
    return [np.asarray(value) for value in tf.nest.flatten(batch)]


def _same_batches(first, second):
    return len(first) == len(second) and all(
        all(np.array_equal(a, b) for a, b in zip(_flat(x), _flat(y))) for x, y in zip(first, second)
    )


def test_docstring_examples():
    results = doctest.testmod(streaming, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("shards/*.jsonl", DataSpec("data", "jsonl", "shards/*.jsonl")),
        ("web=jsonl,field=content:crawl/*.json.gz",
         DataSpec("web", "jsonl", "crawl/*.json.gz", (("field", "content"),))),
        ("books=tfrecord:b-*.tfrecord", DataSpec("books", "tfrecord", "b-*.tfrecord")),
        ("news=hf,streaming=true,split=train:cc_news",
         DataSpec("news", "hf", "cc_news", (("split", "train"), ("streaming", "true")))),
        ("notes=text,boundary=line:notes/a=b.txt",
         DataSpec("notes", "text", "notes/a=b.txt", (("boundary", "line"),))),
        ("C:/corpus/x.parquet", DataSpec("data", "parquet", "C:/corpus/x.parquet")),
    ],
)
def test_parse_data_spec(text, expected):
    assert streaming.parse_data_spec(text) == expected


def test_parse_data_spec_rejects_unknown_options():
    with pytest.raises(DataError, match=r"'colum=text' is not an option of format 'parquet' \("):
        streaming.parse_data_spec("wiki=parquet,colum=text:w/*.parquet")


def test_glam_mixture_is_documented_as_a_flag():
    flag = "web=0.42,wikipedia=0.06,conversations=0.28,forums=0.02,books=0.20,news=0.02"
    assert flag in streaming.__doc__
    assert streaming.parse_mixture(flag) == streaming.GLAM_MIXTURE
    assert sum(streaming.GLAM_MIXTURE.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "text, message",
    [
        ("web=-0.1,books=1", "the weight of 'web' is -0.1; weights must be finite and >= 0"),
        ("web=0.5,web=0.5", "source 'web' is weighted twice"),
        ("web:0.5", "'web:0.5' is not NAME=WEIGHT"),
        ("web=nan", "weights must be finite"),
        ("web=0,books=0", "the weights sum to 0"),
    ],
)
def test_parse_mixture_errors(text, message):
    with pytest.raises(DataError, match=message):
        streaming.parse_mixture(text)


def test_mixture_must_name_exactly_the_sources():
    with pytest.raises(DataError, match=r"--mixture names 'wiki', which no --data spec defines"):
        streaming.mixture_weights(["web", "books"], {"web": 1.0, "wiki": 1.0, "books": 1.0})
    with pytest.raises(DataError, match="--mixture gives no weight to 'books'"):
        streaming.mixture_weights(["web", "books"], {"web": 1.0})


def test_specs_with_one_name_form_one_source(tmp_path):
    (tmp_path / "a.txt").write_text("a\n")
    (tmp_path / "b.jsonl").write_text('{"text": "b"}\n')
    (tmp_path / "c.jsonl").write_text('{"text": "c"}\n')
    built = streaming.sources_from_specs(
        [str(tmp_path / "a.txt"), f"web={tmp_path / 'b.jsonl'}", f"web={tmp_path / 'c.jsonl'}"]
    )
    assert [(s.name, type(s).__name__, len(s.files)) for s in built] == [
        ("data", "TextFiles", 1), ("web", "JsonLines", 2)
    ]
    with pytest.raises(DataError, match="the specs named 'web' differ in format or options"):
        streaming.sources_from_specs(
            [f"web={tmp_path / 'b.jsonl'}", f"web=text:{tmp_path / 'a.txt'}"]
        )


def test_hugging_face_and_quality_specs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "a.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n')
    spec = f"news=hf,data_files={tmp_path / 'a.jsonl'},field=body,streaming=true:json"
    (news,) = streaming.sources_from_specs([spec])
    assert (news.name, news.streaming) == ("news", True)
    assert [t.decode() for t in news.documents().as_numpy_iterator()] == ["one", "two"]
    with pytest.raises(DataError, match="web: quality filter: No quality classifier at"):
        streaming.sources_from_specs(
            [f"web=jsonl,quality={tmp_path / 'none.keras'}:{tmp_path / 'a.jsonl'}"]
        )


def _data(tokenizer, source_list, **kwargs):
    settings = {"sequence_length": 32, "batch_size": 4, "held_out_fraction": 0.2,
                "shuffle_buffer": 64}
    settings.update(kwargs)
    return StreamingData(source_list, tokenizer, **settings)


def test_training_batches_are_deterministic_per_seed(tokenizer):
    data = _data(tokenizer, [sources.DocumentList(_documents("a", 200))])
    first = list(data.training_dataset(seed=1).take(5).as_numpy_iterator())
    again = list(data.training_dataset(seed=1).take(5).as_numpy_iterator())
    other = list(data.training_dataset(seed=2).take(5).as_numpy_iterator())
    assert _same_batches(first, again) and not _same_batches(first, other)
    x, y, sample_weight = first[0]
    assert x["token_ids"].shape == y.shape == sample_weight.shape == (4, 32)


def _document_texts(data, held_out):
    return {
        text.decode()
        for source in data.sources
        for text in data.split_documents(source, held_out).as_numpy_iterator()
    }


def test_held_out_documents_never_reach_training(tokenizer):
    documents = _documents("a", 300)
    data = _data(tokenizer, [sources.DocumentList(documents)], held_out_documents=1000)
    held_out, train = _document_texts(data, True), _document_texts(data, False)
    assert held_out.isdisjoint(train) and held_out | train == set(documents)
    assert 0.12 < len(held_out) / len(documents) < 0.28
    assert {t.decode() for t in data.held_out_texts().as_numpy_iterator()} == held_out
    held_out_batches = data.held_out_dataset()
    assert held_out_batches.cardinality().numpy() == sum(1 for _ in held_out_batches)
    assert all(x["token_ids"].shape == (4, 32) for x, _, _ in held_out_batches.as_numpy_iterator())


def test_held_out_set_is_bounded_and_shared_by_weight(tokenizer):
    data = _data(
        tokenizer,
        [
            sources.DocumentList(_documents("a", 400), "a"),
            sources.DocumentList(_documents("b", 400), "b"),
        ],
        weights=[3, 1],
        held_out_documents=20,
    )
    texts = [t.decode() for t in data.held_out_texts().as_numpy_iterator()]
    assert [t[0] for t in texts] == ["a"] * 15 + ["b"] * 5


def test_mixture_weights_are_shares_of_rows(tokenizer):
    alpha, omega = (set(np.asarray(tokenizer(f"{w} {w}")).tolist()) for w in ("alpha", "omega"))
    alpha_ids, omega_ids = alpha - omega, omega - alpha
    data = _data(
        tokenizer,
        [
            sources.DocumentList(["alpha " * 40] * 50, "a"),
            sources.DocumentList(["omega " * 40] * 50, "b"),
        ],
        weights=[0.8, 0.2],
        held_out_fraction=0.01,
    )
    rows = collections.Counter()
    for x, _, _ in data.training_dataset(seed=0).take(100).as_numpy_iterator():
        for row in x["token_ids"]:
            tokens = set(row.tolist())
            rows["a" if tokens & alpha_ids else "b" if tokens & omega_ids else "?"] += 1
    assert rows["a"] / 400 == pytest.approx(0.8, abs=0.06) and rows["?"] == 0


def test_unigram_entropy_from_a_bounded_sample(tokenizer):
    data = _data(tokenizer, [sources.DocumentList(_documents("a", 200))])
    held_out = data.held_out_dataset()
    entropy = data.unigram_entropy(held_out, seed=0, baseline_tokens=3 * 4 * 32)
    counts = collections.Counter()  # An independent count over the same 3 batches.
    for _, y, weight in data.training_dataset(seed=0).take(3).as_numpy_iterator():
        counts.update(int(t) for t in y[weight > 0])
    vocabulary, total = tokenizer.vocabulary_size(), sum(counts.values())
    losses = [
        -np.log((counts[int(t)] + 1) / (total + vocabulary))
        for _, y, weight in held_out.as_numpy_iterator()
        for t in y[weight > 0]
    ]
    assert entropy == pytest.approx(np.mean(losses), rel=1e-9)


def test_hosts_get_disjoint_documents(tokenizer):
    documents = _documents("a", 100)
    shares = [
        _document_texts(
            _data(tokenizer, [sources.DocumentList(documents)], num_hosts=2, host_index=host), False
        )
        for host in (0, 1)
    ]
    assert shares[0].isdisjoint(shares[1]) and shares[0] and shares[1]


def _write_mixed_corpus(root):
    import pyarrow
    import pyarrow.parquet

    for shard in range(3):
        with open(root / f"web-{shard}.jsonl", "w") as file:
            for text in _documents(f"web{shard}", 150):
                file.write(json.dumps({"text": text}) + "\n")
    pyarrow.parquet.write_table(
        pyarrow.table({"text": _documents("wiki", 400)}), root / "wiki.parquet", row_group_size=90
    )
    (root / "books.txt").write_text("\n\n".join(_documents("book", 200)) + "\n")


def _mixed_data(tokenizer, root):
    return StreamingData.from_specs(
        [f"web={root}/web-*.jsonl", f"wiki={root}/wiki.parquet", f"books={root}/books.txt"],
        tokenizer,
        mixture="web=0.5,wiki=0.3,books=0.2",
        sequence_length=32,
        batch_size=4,
        held_out_fraction=0.1,
        shuffle_buffer=32,
    )


def test_resume_continues_exactly_without_reading_again(tokenizer, tmp_path, parsed_lines):
    _write_mixed_corpus(tmp_path)
    uninterrupted = _mixed_data(tokenizer, tmp_path).training_iterator(seed=7)
    reference = [next(uninterrupted) for _ in range(60)]

    iterator = _mixed_data(tokenizer, tmp_path).training_iterator(seed=7)
    assert _same_batches([next(iterator) for _ in range(43)], reference[:43])  # Keras pulls ahead.
    (tmp_path / "ckpt").mkdir()
    written = iterator.save(str(tmp_path / "ckpt"), position=40)
    assert "data_iterator.index" in written and "data_pending.npz" in written

    resumed = _mixed_data(tokenizer, tmp_path).training_iterator(seed=7)
    parsed_when_built = sum(parsed_lines)  # Building checks the first document of each source.
    assert resumed.restore(str(tmp_path / "ckpt")) == 40
    assert _same_batches([next(resumed) for _ in range(20)], reference[40:60])
    # The web files' lines read before the checkpoint were not parsed again (reading from the
    # start would parse all 450; the 20 batches need less than half an epoch of web text).
    assert sum(parsed_lines) - parsed_when_built < 150


def test_resume_with_a_streamed_hugging_face_source(tokenizer, tmp_path):
    import datasets

    with open(tmp_path / "a.jsonl", "w") as file:
        for text in _documents("hf", 400):
            file.write(json.dumps({"text": text}) + "\n")

    def data():
        streamed = datasets.load_dataset(
            "json", data_files=str(tmp_path / "a.jsonl"), split="train", streaming=True
        )
        return _data(tokenizer, [sources.HuggingFaceDataset(streamed, name="hf")])

    iterator = data().training_iterator(seed=1)
    reference = [next(iterator) for _ in range(30)]
    iterator.save(str(tmp_path), position=25)
    resumed = data().training_iterator(seed=1)
    resumed.restore(str(tmp_path))
    assert _same_batches([next(resumed) for _ in range(5)], reference[25:30])


def test_handing_out_again_and_the_window(tokenizer, tmp_path):
    data = _data(tokenizer, [sources.DocumentList(_documents("a", 100))])
    iterator = data.training_iterator(seed=0, window=4)
    batches = [next(iterator) for _ in range(6)]
    generator = iterator.batches(position=3)
    assert _same_batches([next(generator) for _ in range(3)], batches[3:6])
    with pytest.raises(ValueError, match="Cannot hand out batch 1: batches 2 to 6 are kept"):
        iterator.batches(1)
    with pytest.raises(ValueError, match="Cannot save at batch 0"):
        iterator.save(str(tmp_path), position=0)


def test_every_generator_has_its_own_cursor(tokenizer):
    """Keras makes two iterators per `fit` and drops one: pulls from one must not move the
    other."""
    data = _data(tokenizer, [sources.DocumentList(_documents("a", 100))])
    reference = list(data.training_dataset(seed=0).take(4).as_numpy_iterator())
    iterator = data.training_iterator(seed=0)
    first, second = iterator.batches(0), iterator.batches(0)
    interleaved = [next(first), next(second), next(first), next(second), next(first)]
    assert _same_batches(interleaved, [reference[i] for i in (0, 0, 1, 1, 2)])
    assert iterator.position == 3  # One past the furthest batch handed out.
    assert _same_batches([next(iterator)], reference[3:4])


def test_saving_before_any_batch_pins_the_stream(tokenizer, tmp_path):
    """The saved state holds the shuffle seeds even when nothing was pulled yet, so another
    TensorFlow global seed at restore changes nothing."""
    documents = [sources.DocumentList(_documents("a", 300))]
    tf.random.set_seed(1)  # Before the tokenizer: seeding drops its TensorFlow resources.
    iterator = _data(GLaMTokenizer.from_preset("glam_tiny_8e"), documents).training_iterator(3)
    iterator.save(str(tmp_path), position=0)
    reference = [next(iterator) for _ in range(4)]
    tf.random.set_seed(2)
    restored = _data(GLaMTokenizer.from_preset("glam_tiny_8e"), documents).training_iterator(3)
    assert restored.restore(str(tmp_path)) == 0
    assert _same_batches([next(restored) for _ in range(4)], reference)


def _text_shards(root, count=6, lines=12):
    root.mkdir(exist_ok=True)
    for shard in range(count):
        texts = [f"File {shard} line {i} is {'long ' * (i % 3)}." for i in range(lines)]
        (root / f"part-{shard}.txt").write_text("\n".join(texts) + "\n")
    return str(root / "*.txt")


def test_files_are_read_in_a_new_seeded_order_each_epoch(tmp_path):
    source = sources.TextFiles(
        _text_shards(tmp_path), document_boundary="line", files_read_at_once=1
    )

    def file_orders(shuffle_seed, epochs=3):
        documents = source.documents(shuffle_seed=shuffle_seed)  # Endless with a seed.
        documents = documents.repeat() if shuffle_seed is None else documents
        files = [int(text.split()[1]) for text in documents.take(72 * epochs).as_numpy_iterator()]
        return [tuple(dict.fromkeys(files[i : i + 72])) for i in range(0, len(files), 72)]

    assert file_orders(None) == [tuple(range(6))] * 3  # Sorted, unshuffled: held-out reads.
    orders = file_orders(5)
    assert all(sorted(order) == list(range(6)) for order in orders)
    assert len(set(orders)) == 3 and orders == file_orders(5) and orders != file_orders(6)


def test_resume_across_epochs_of_shuffled_files(tokenizer, tmp_path):
    pattern = _text_shards(tmp_path / "shards", lines=8)

    def data():
        source = sources.TextFiles(pattern, document_boundary="line", name="t")
        return _data(tokenizer, [source], shuffle_buffer=4, held_out_fraction=0.1)

    reference = list(data().training_dataset(seed=2).take(30).as_numpy_iterator())
    iterator = data().training_iterator(seed=2)
    assert _same_batches([next(iterator) for _ in range(12)], reference[:12])  # > 1 epoch.
    iterator.save(str(tmp_path), position=10)
    resumed = data().training_iterator(seed=2)
    assert resumed.restore(str(tmp_path)) == 10
    assert _same_batches([next(resumed) for _ in range(20)], reference[10:30])


@pytest.mark.parametrize("change", ["boundary", "files", "vocabulary"])
def test_resuming_on_changed_input_is_refused(tokenizer, tmp_path, change):
    pattern = _text_shards(tmp_path / "shards")

    def data(boundary="line", vocabulary=tokenizer):
        source = sources.TextFiles(pattern, document_boundary=boundary, name="t")
        return _data(vocabulary, [source], held_out_fraction=0.1)

    iterator = data().training_iterator(seed=0)
    iterator.save(str(tmp_path), position=0)
    data().training_iterator(seed=0).restore(str(tmp_path))  # The same input resumes.
    if change == "boundary":
        other = data(boundary="blank_line")
    elif change == "files":
        with open(tmp_path / "shards" / "part-5.txt", "a") as file:
            file.write("One more line.\n")  # Same names, another size.
        other = data()
    else:
        from keras_glam.data.embedded_corpus import pydoc_documents
        from keras_glam.data.vocabulary import train_vocabulary

        path = str(tmp_path / "other.spm")
        train_vocabulary(pydoc_documents()[:20], 600, output_path=path)
        other = data(vocabulary=GLaMTokenizer(proto=path))
    differs = "tokenizer" if change == "vocabulary" else "sources"
    message = f"saved for another input \\({differs} differ.*Resume with the same settings"
    with pytest.raises(ValueError, match=message):
        other.training_iterator(seed=0).restore(str(tmp_path))


def test_restoring_on_another_input_is_refused(tokenizer, tmp_path):
    data = _data(tokenizer, [sources.DocumentList(_documents("a", 100))])
    iterator = data.training_iterator(seed=0)
    next(iterator)
    iterator.save(str(tmp_path), position=1)
    with pytest.raises(ValueError, match="saved for another input"):
        data.training_iterator(seed=1).restore(str(tmp_path))
    with pytest.raises(ValueError, match="holds no data iterator state"):
        data.training_iterator(seed=0).restore(str(tmp_path / "nowhere"))


def test_a_bad_line_mid_stream_becomes_a_data_error(tokenizer, tmp_path):
    lines = [json.dumps({"text": t}) for t in _documents("a", 700)]
    lines[600] = json.dumps({"body": "no text here"})  # Past the first parsed batch of lines.
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    data = StreamingData.from_specs(
        [str(tmp_path / "a.jsonl")], tokenizer, sequence_length=32, batch_size=4, shuffle_buffer=0
    )
    data.check()  # The start of the file is fine.
    message = r"a.jsonl: line 601 has no text field 'text' \(found: body\)"
    with pytest.raises(DataError, match=message):
        for _ in data.training_iterator(seed=0):
            pass


def test_check_names_an_empty_source(tokenizer):
    data = _data(
        tokenizer,
        [sources.DocumentList(_documents("a", 50), "a"), sources.DocumentList([""] * 5, "blank")],
    )
    with pytest.raises(DataError, match="blank: no training document with text among its first"):
        data.check()


def test_check_names_a_source_the_filter_empties(tokenizer):
    from keras_glam.data.quality import FilteredSource
    from keras_glam.data.quality import QualityClassifier

    untrained = QualityClassifier({"num_bins": 64, "max_features": 8})  # Every score is 0.5:
    # P(keep) = 1.5 ** -1000 with alpha 1000.
    web = FilteredSource(sources.DocumentList(_documents("w", 80), "web"), untrained, alpha=1000)
    data = _data(tokenizer, [sources.DocumentList(_documents("a", 50), "a"), web])
    with pytest.raises(DataError, match="web: no training document with text among its first 60"):
        data.check(max_documents=60)


def test_no_held_out_document_is_a_data_error(tokenizer):
    data = _data(tokenizer, [sources.DocumentList(["just one document"])], held_out_fraction=0.001)
    with pytest.raises(DataError, match="No held-out document"):
        data.held_out_dataset()


def test_pad_batches():
    x = {"token_ids": tf.ones([3, 5], tf.int32), "padding_mask": tf.ones([3, 5], tf.int32)}
    dataset = tf.data.Dataset.from_tensors((x, tf.ones([3, 5], tf.int32), tf.ones([3, 5])))
    (x, y, weight), = streaming.pad_batches(dataset, 4).as_numpy_iterator()
    assert x["padding_mask"].sum(axis=1).tolist() == [5, 5, 5, 0] and weight[3].sum() == 0


def test_each_host_saves_its_own_iterator_files(tokenizer, tmp_path):
    """Hosts sharing a checkpoint directory write files named by host: none overwrites
    another's, and each restores its own."""
    documents = _documents("a", 200)
    iterators = [
        _data(tokenizer, [sources.DocumentList(documents)], num_hosts=2, host_index=host)
        .training_iterator(seed=0)
        for host in (0, 1)
    ]
    batches = [[next(iterator) for _ in range(3)] for iterator in iterators]
    written = [iterator.save(str(tmp_path), position=2) for iterator in iterators]
    assert all(name.startswith("data-host00000_") for name in written[0])
    assert all(name.startswith("data-host00001_") for name in written[1])
    assert set(written[0]).isdisjoint(written[1])
    for host, expected in enumerate(batches):
        data = _data(tokenizer, [sources.DocumentList(documents)], num_hosts=2, host_index=host)
        restored = data.training_iterator(seed=0)
        assert restored.restore(str(tmp_path)) == 2
        assert _same_batches([next(restored)], expected[2:])
    single = _data(tokenizer, [sources.DocumentList(documents)]).training_iterator(seed=0)
    with pytest.raises(ValueError, match="holds no data iterator state \\(data_iterator.json\\)"):
        single.restore(str(tmp_path))


def test_training_tokens_counts_framed_documents_up_to_a_bound(tokenizer):
    documents = _documents("a", 40)
    data = _data(tokenizer, [sources.DocumentList(documents[:20], "a"),
                             sources.DocumentList(documents[20:], "b")])
    training = [text.decode() for source in data.sources
                for text in data.split_documents(source).as_numpy_iterator()]
    framed = sum(len(tokenizer(text)) + 2 for text in training)  # <s> text </s>
    assert data.training_tokens(at_most=10**6) == framed
    # Bounded: whole rows of the first source only, once they reach the bound.
    assert data.training_tokens(at_most=40) == 64
