"""Document sources: every format read back exactly, host shares, bad input named precisely."""

import doctest
import gzip
import json

import numpy as np
import pytest
import tensorflow as tf

from keras_glam.data import sources
from keras_glam.data.sources import DataError


def _texts(dataset):
    return [text.decode("utf-8") for text in dataset.as_numpy_iterator()]


def _first_error_message(dataset, source):
    with pytest.raises(tf.errors.OpError) as caught:
        for _ in dataset:
            pass
    return sources.describe_data_error(caught.value, [source])


def test_docstring_examples():
    results = doctest.testmod(sources, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0


def test_text_files_paragraphs_lines_and_whole_files(tmp_path):
    (tmp_path / "a.txt").write_text("one,\nstill one\n\n \ntwo\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as file:
        file.write("three\n\nfour\n")
    pattern = str(tmp_path / "*.txt*")
    one_at_a_time = {"files_read_at_once": 1}
    assert _texts(sources.TextFiles(pattern, **one_at_a_time).documents()) == [
        "one,\nstill one", "two", "three", "four"
    ]
    assert _texts(sources.TextFiles(pattern, "line", **one_at_a_time).documents()) == [
        "one,", "still one", "two", "three", "four"
    ]
    whole = sources.TextFiles(str(tmp_path / "a.txt"), "file").documents()
    assert _texts(whole) == ["one,\nstill one\n\n \ntwo\n"]
    with pytest.raises(DataError, match="b.txt.gz: document_boundary='file'"):
        sources.TextFiles(pattern, "file")


@pytest.mark.parametrize("boundary", ["blank_line", "line", "file"])
def test_text_not_utf8_names_file_line_and_byte(tmp_path, boundary):
    data = "good line\n\nsecond paragraph, é\n".encode() + b"bad \xff byte\n"
    path = tmp_path / "latin.txt"
    path.write_bytes(data)
    offset = data.index(b"\xff")
    source = sources.TextFiles(str(path), boundary)
    message = _first_error_message(source.documents(), source)
    assert message.startswith(f"{path}: line 4 is not UTF-8 text: byte {offset} ")
    assert "iconv" in message


def test_check_reads_the_start_of_every_file(tmp_path):
    (tmp_path / "a.txt").write_text("fine\n")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match=r"b.txt: the file is not UTF-8 text: byte 3 is b'\\xe9'"):
        sources.TextFiles(str(tmp_path / "*.txt")).check()


def test_missing_files_and_empty_globs_are_named(tmp_path):
    with pytest.raises(DataError, match=r"web: no file matches '.*nothing-\*\.jsonl'"):
        sources.JsonLines(str(tmp_path / "nothing-*.jsonl"), name="web")
    with pytest.raises(DataError, match="no file matches .*missing.txt"):
        sources.TextFiles([str(tmp_path / "missing.txt")])


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")


def test_json_lines_named_field_blank_lines_and_order(tmp_path):
    records = [{"body": f"document {i}", "id": i} for i in range(600)]  # > one parse batch
    _write_jsonl(tmp_path / "a.jsonl", records)
    with open(tmp_path / "a.jsonl", "a") as file:
        file.write("\n   \n")
    source = sources.JsonLines(str(tmp_path / "a.jsonl"), field="body")
    source.check()
    assert _texts(source.documents()) == [record["body"] for record in records]


def test_json_line_without_the_field_is_named(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}] * 300 + [{"content": "y", "url": "u"}])
    source = sources.JsonLines(str(tmp_path / "a.jsonl"))
    message = _first_error_message(source.documents(), source)
    assert message.startswith(f"{tmp_path / 'a.jsonl'}: line 301 has no text field 'text' ")
    assert "(found: content, url)" in message and "field=NAME" in message
    _write_jsonl(tmp_path / "b.jsonl", [{"content": "y"}])
    with pytest.raises(DataError, match="b.jsonl: line 1 has no text field 'text'"):
        sources.JsonLines(str(tmp_path / "b.jsonl")).check()


def test_json_lines_bad_json_and_bad_bytes(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": broken}\n')
    source = sources.JsonLines(str(tmp_path / "a.jsonl"))
    assert "line 2 is not JSON (Expecting value at column 10)" in _first_error_message(
        source.documents(), source
    )
    data = b'{"text": "fine"}\n{"text": "caf\xe9"}\n'
    (tmp_path / "b.jsonl").write_bytes(data)
    offset = data.index(b"\xe9")
    source = sources.JsonLines(str(tmp_path / "b.jsonl"))
    message = _first_error_message(source.documents(), source)
    assert f"line 2 is not UTF-8 text: byte {offset} " in message


def test_parquet_slices_across_row_groups_in_order(tmp_path):
    import pyarrow
    import pyarrow.parquet

    texts = [f"row {i}" for i in range(1000)]
    table = pyarrow.table({"id": list(range(1000)), "content": texts})
    pyarrow.parquet.write_table(table, tmp_path / "a.parquet", row_group_size=300)
    source = sources.ParquetFiles(str(tmp_path / "a.parquet"), field="content", rows_per_read=128)
    assert _texts(source.documents()) == texts
    # 4 row groups (300, 300, 300, 100 rows) in slices of at most 128 rows.
    assert source.slices[:, 3].tolist() == [128, 128, 44] * 3 + [100]


def test_parquet_missing_column_and_corrupt_footer(tmp_path):
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "a.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"body": ["x"], "n": [1]}), path)
    with pytest.raises(DataError, match=r"a.parquet: no string column 'text' \(columns: body, n\)"):
        sources.ParquetFiles(str(path))
    (tmp_path / "b.parquet").write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match="b.parquet: not a readable Parquet file"):
        sources.ParquetFiles(str(tmp_path / "b.parquet"), field="body")


def _damaged_parquet_copy(whole, row_group, path):
    """`whole` with a byte flipped in the middle of `row_group`'s (uncompressed) dictionary
    page: unless its checksum is verified, documents silently read as other text."""
    import pyarrow.parquet

    column = pyarrow.parquet.ParquetFile(whole).metadata.row_group(row_group).column(0)
    data = bytearray(whole.read_bytes())
    data[(column.dictionary_page_offset + column.data_page_offset) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return str(path)


def test_damaged_parquet_page_is_named_in_check_and_while_streaming(tmp_path):
    import pyarrow
    import pyarrow.parquet

    whole = tmp_path / "whole.parquet"
    table = pyarrow.table({"text": [f"row {i} " * 5 for i in range(900)]})
    pyarrow.parquet.write_table(
        table, whole, row_group_size=300, compression="none", write_page_checksum=True
    )
    path = _damaged_parquet_copy(whole, 1, tmp_path / "damaged.parquet")
    source = sources.ParquetFiles(path, rows_per_read=100)
    source.check()  # Row group 0, read before training, is sound.
    message = _first_error_message(source.documents(), source)
    assert message.startswith(f"{path}: row group 1 (rows 0-99) is unreadable (could not verify")
    assert message.endswith("Re-create the file or leave it out.") and "\n" not in message
    first = _damaged_parquet_copy(whole, 0, tmp_path / "first.parquet")
    both = sources.ParquetFiles([str(whole), first], rows_per_read=100)
    with pytest.raises(DataError, match=r"first.parquet: row group 0 \(rows 0-99\) is unreadable"):
        both.check()  # The first slice of every file is read.


def _write_tfrecord(path, features):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for feature in features:
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        name: tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
                        for name, values in feature.items()
                    }
                )
            )
            writer.write(example.SerializeToString())


def test_tfrecord_examples_and_a_record_without_the_feature(tmp_path):
    texts = [f"record {i}".encode() for i in range(300)]
    _write_tfrecord(tmp_path / "a.tfrecord", [{"text": [text]} for text in texts])
    source = sources.TFRecordFiles(str(tmp_path / "a.tfrecord"))
    source.check()
    assert _texts(source.documents()) == [text.decode() for text in texts]
    _write_tfrecord(tmp_path / "b.tfrecord", [{"text": [b"ok"]}, {"body": [b"x"]}])
    source = sources.TFRecordFiles(str(tmp_path / "b.tfrecord"))
    message = _first_error_message(source.documents(), source)
    assert message.startswith(f"{tmp_path / 'b.tfrecord'}: record 1 has no bytes feature 'text'")


def _record_offsets(path):
    """Byte offset of each record of a valid TFRecord file (data length + 16 bytes each)."""
    records = tf.data.TFRecordDataset(str(path)).as_numpy_iterator()
    lengths = [len(record) + 16 for record in records]
    return np.cumsum([0] + lengths[:-1]).tolist()


def test_corrupt_tfrecord_shard_is_named(tmp_path):
    _write_tfrecord(tmp_path / "a.tfrecord", [{"text": [b"fine %d" % i]} for i in range(50)])
    data = bytearray((tmp_path / "a.tfrecord").read_bytes())
    offsets = _record_offsets(tmp_path / "a.tfrecord")
    data[offsets[20] + 14] ^= 0xFF  # In record 20's data: its checksum fails.
    (tmp_path / "b.tfrecord").write_bytes(bytes(data))
    source = sources.TFRecordFiles(str(tmp_path / "*.tfrecord"), files_read_at_once=1)
    assert _first_error_message(source.documents(), source) == (
        f"{tmp_path / 'b.tfrecord'}: corrupt TFRecord shard: record 20 (at byte {offsets[20]}) "
        "fails its checksum. Re-create the shard or leave it out."
    )
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "c.tfrecord").write_bytes(b"")
    with pytest.raises(DataError, match="c.tfrecord: the TFRecord shard holds no record"):
        sources.TFRecordFiles(str(tmp_path / "empty" / "*.tfrecord")).check()


# Bytes cut off the end of a shard: inside the last record's data (tf.data raises DataLossError)
# and inside its 12-byte header (tf.data ends the file there silently, dropping the record).
@pytest.mark.parametrize("cut_into", ["data", "header"])
@pytest.mark.parametrize("suffix", [".tfrecord", ".tfrecord.gz"])
def test_truncated_tfrecord_shard_is_named(tmp_path, cut_into, suffix):
    _write_tfrecord(tmp_path / "whole", [{"text": [b"document %d" % i]} for i in range(300)])
    data = (tmp_path / "whole").read_bytes()
    last = _record_offsets(tmp_path / "whole")[-1]
    kept = data[: last + 5] if cut_into == "header" else data[:-3]
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(gzip.compress(kept) if suffix.endswith(".gz") else kept)
    expected = (
        f"{path}: truncated TFRecord shard: the file ends inside record 299 (at byte {last}). "
        "Re-create the shard or leave it out."
    )
    source = sources.TFRecordFiles(str(path))
    assert _first_error_message(source.documents(), source) == expected
    if suffix == ".tfrecord":  # Before training; a .gz file is only read whole when streamed.
        with pytest.raises(DataError) as caught:
            source.check()
        assert str(caught.value) == expected


def test_tfrecord_stream_resumes_with_its_byte_count(tmp_path):
    # The end-of-file check counts the bytes read: a restored iterator must carry the count.
    for shard in range(3):
        texts = [{"text": [b"shard %d document %d" % (shard, i)]} for i in range(400)]
        _write_tfrecord(tmp_path / f"{shard}.tfrecord", texts)
    source = sources.TFRecordFiles(str(tmp_path / "*.tfrecord"), files_read_at_once=2)
    everything = _texts(source.documents())
    iterator = iter(source.documents())
    head = [next(iterator).numpy().decode() for _ in range(700)]
    path = tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / "it"))
    restored = iter(source.documents())
    tf.train.Checkpoint(iterator=restored).read(path).assert_consumed()
    assert len(everything) == 1200
    assert head + [text.numpy().decode() for text in restored] == everything


def test_hugging_face_map_style_and_streaming(tmp_path):
    import datasets

    texts = [f"example {i}" for i in range(600)]
    source = sources.HuggingFaceDataset(datasets.Dataset.from_dict({"text": texts}))
    assert _texts(source.documents()) == texts
    _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:300]])
    _write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[300:]])
    streamed = datasets.load_dataset(
        "json", data_files=str(tmp_path / "*.jsonl"), split="train", streaming=True
    )
    source = sources.HuggingFaceDataset(streamed, name="stream")
    source.check()
    assert _texts(source.documents()) == texts
    with pytest.raises(DataError, match=r"stream: no column 'body' .* \(columns: text\)"):
        sources.HuggingFaceDataset(streamed, field="body", name="stream")


def test_hugging_face_stream_resumes_from_its_saved_position(tmp_path):
    import datasets

    texts = [f"example {i}" for i in range(1000)]
    _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    streamed = datasets.load_dataset(
        "json", data_files=str(tmp_path / "a.jsonl"), split="train", streaming=True
    )
    source = sources.HuggingFaceDataset(streamed)
    iterator = iter(source.documents())
    head = [next(iterator).numpy().decode() for _ in range(300)]
    path = tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / "it"))
    restored = iter(source.documents())
    tf.train.Checkpoint(iterator=restored).read(path).assert_consumed()
    assert head == texts[:300]
    assert [t.numpy().decode() for t in restored] == texts[300:]


def _shares(source, num_hosts):
    return [set(_texts(source.documents(num_hosts, host))) for host in range(num_hosts)]


@pytest.mark.parametrize("num_files, by_file", [(8, True), (3, False)])
def test_hosts_read_disjoint_shares_by_file_or_element(tmp_path, num_files, by_file):
    everything = set()
    for index in range(num_files):
        lines = [f"file {index} line {line}" for line in range(5)]
        (tmp_path / f"{index}.txt").write_text("\n".join(lines) + "\n")
        everything.update(lines)
    source = sources.TextFiles(str(tmp_path / "*.txt"), "line")
    assert source.shards_by_file(2) is by_file
    shares = _shares(source, 2)
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == everything
    files_of = [{text.split(" line")[0] for text in share} for share in shares]
    assert files_of[0].isdisjoint(files_of[1]) is by_file


def test_parquet_and_hugging_face_host_shares(tmp_path):
    import datasets
    import pyarrow
    import pyarrow.parquet

    texts = [f"row {i}" for i in range(700)]
    pyarrow.parquet.write_table(pyarrow.table({"text": texts}), tmp_path / "a.parquet")
    for source in (
        sources.ParquetFiles(str(tmp_path / "a.parquet"), rows_per_read=100),
        sources.HuggingFaceDataset(datasets.Dataset.from_dict({"text": texts})),
    ):
        shares = _shares(source, 3)
        assert sum(len(share) for share in shares) == len(texts)
        assert set().union(*shares) == set(texts)


def test_held_out_mask_depends_on_the_text_only():
    texts = [f"document number {i}" for i in range(20000)]
    mask = sources.held_out_mask(tf.constant(texts), 0.1).numpy()
    assert abs(mask.mean() - 0.1) < 0.01
    shuffled = np.random.default_rng(0).permutation(len(texts))
    again = sources.held_out_mask(tf.constant([texts[i] for i in shuffled]), 0.1).numpy()
    np.testing.assert_array_equal(again, mask[shuffled])
    larger = sources.held_out_mask(tf.constant(texts), 0.2).numpy()
    assert np.all(larger[mask])  # A larger fraction only adds documents.


def test_format_of_path():
    assert sources.format_of_path("a/b.jsonl.gz") == "jsonl"
    assert sources.format_of_path("shard-0001.tfrecord") == "tfrecord"
    assert sources.format_of_path("x.parquet") == "parquet"
    assert sources.format_of_path("notes") == "text"


def test_loading_a_missing_hugging_face_dataset_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as caught:
        sources.load_hugging_face("json", data_files=str(tmp_path / "none-*.jsonl"))
    assert str(caught.value).startswith("hf:json: cannot load the Hugging Face dataset (")
    assert "\n" not in str(caught.value)


def test_document_list_rejects_non_strings():
    with pytest.raises(TypeError, match="list of `str`"):
        sources.DocumentList(["ok", 3])
    with pytest.raises(DataError, match="empty"):
        sources.DocumentList([], name="empty").check()
