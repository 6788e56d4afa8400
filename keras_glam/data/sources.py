"""Corpora in files or Hugging Face datasets, read as `tf.data` datasets of documents.

Every source here yields scalar `tf.string` documents, streaming: nothing holds the corpus in
memory, and each is a plain `tf.data` pipeline whose position can be saved with the training
checkpoint (`tf.train.Checkpoint(iterator=...)`, see `keras_glam.data.streaming`).

- `TextFiles`: paragraphs, lines or whole files of UTF-8 text (`tf.data.TextLineDataset`);
- `JsonLines`: one JSON object per line, the text in a named field (`TextLineDataset`, `json`);
- `ParquetFiles`: one row per document, the text in a named column (`pyarrow`, a slice at a
  time);
- `TFRecordFiles`: one `tf.train.Example` per document, the text in a named bytes feature
  (`tf.data.TFRecordDataset`);
- `HuggingFaceDataset`: one example per document of a `datasets.Dataset`, or of a
  `datasets.IterableDataset` (`streaming=True`);
- `DocumentList`: a list of `str` in memory.

File sources take paths or glob patterns (every pattern must match a file), read their files in
sorted order, or, for training (`documents(..., shuffle_seed=...)`), endlessly in an order
drawn anew each epoch from the seed, and interleave a few of them at a time
(deterministically); `.gz` files are decompressed on the fly (text, JSON lines, TFRecord). `documents(num_hosts, host_index)` gives
one host's disjoint share: whole files when there are at least `files_per_host` files per host,
otherwise every `num_hosts`-th element (Parquet and Hugging Face datasets: every `num_hosts`-th
slice of rows, or Hugging Face's own `split_dataset_by_node`).

Bad input raises `DataError` (a `ValueError`) with one line naming the file and the place in it
(line, byte offset, record or row group) and the fix. What can be known before training is
checked when a source is built (files exist, Parquet footers and columns) and by `check()` (the
first record or slice of every file, and the record lengths of TFRecord files, which find a shard
cut short); what is only found by reading the whole corpus (a bad byte in the middle of a shard)
stops the stream with the same kind of message (`describe_error` turns the
`tf.errors` of a `tf.data` iterator back into it).

Every source's `repr` is its identity: what decides its documents and their order (class, name,
a digest of the file list with sizes, format options). A saved data stream records it, so that
resuming on other input is refused.
"""

import codecs
import collections
import copy
import gzip
import hashlib
import itertools
import json
import os
import re

import numpy as np
import tensorflow as tf

from keras_glam.data.text_sources import paragraphs

DOCUMENT_BOUNDARIES = ("blank_line", "line", "file")
# Documents handed to Python at once (JSON parsing, Parquet and Hugging Face reads): large enough
# to amortise the Python call, small enough to keep the iterator's saved state small.
PYTHON_BATCH = 256
# Bytes of each text file decoded by `check()` before training.
CHECKED_PREFIX_BYTES = 1 << 16
HELD_OUT_BUCKETS = 1_000_000
# A TFRecord record: its data's length (8 bytes) and the length's CRC (4), the data, its CRC (4).
TFRECORD_HEADER_BYTES = 12
TFRECORD_FRAMING_BYTES = 16
# `TFRecordDataset`'s words for a record whose CRC fails and one the file ends inside.
_TFRECORD_DATA_LOSS = re.compile(r"(corrupted|truncated) record at (\d+)")
# Bytes read at once when walking a TFRecord file's record headers.
HEADER_READ_BYTES = 1 << 16


class DataError(ValueError):
    """A problem in the input data, described in one line naming the file (or source), the
    place in it, and the fix."""


def expand_paths(paths, what="data"):
    """Sorted files matching each path or glob pattern, patterns in the order given.

    Args:
        paths: a path or pattern (`str`, `os.PathLike`), or a list of them.
        what: how the files are named in error messages (e.g. the source name).

    Returns:
        The list of files (directories matched by a pattern are left out).

    Raises:
        DataError: a pattern matches no file, or no path is given.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for pattern in paths:
        pattern = os.fspath(pattern)
        matches = sorted(tf.io.gfile.glob(pattern))
        matches = [path for path in matches if not tf.io.gfile.isdir(path)]
        if not matches:
            raise DataError(f"{what}: no file matches {pattern!r}. Check the path or glob pattern.")
        files.extend(matches)
    if not files:
        raise DataError(f"{what}: no path given. Pass at least one file or glob pattern.")
    return files


def _compression(path):
    return "GZIP" if path.endswith(".gz") else ""


def _open_binary(path):
    file = tf.io.gfile.GFile(path, "rb")
    return gzip.GzipFile(fileobj=file) if _compression(path) else file


def _as_str(value):
    return value.decode() if isinstance(value, bytes) else value


def _byte_offset_of_line(path, line_number):
    """Byte offset (in the uncompressed file) at which 1-based `line_number` starts."""
    offset = 0
    with _open_binary(path) as file:
        for line in itertools.islice(file, line_number - 1):
            offset += len(line)
    return offset


def _utf8_error(text):
    """`(position, bad_bytes)` of the first invalid UTF-8 in `text`, or None."""
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start, text[error.start : error.end]
    return None


def _not_utf8(path, place, position, bad_bytes):
    return DataError(
        f"{path}: {place} is not UTF-8 text: byte {position} is {bad_bytes!r}. Convert the file "
        f"to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or leave it out."
    )


def _raise_first_bad_line(path, line_numbers, lines):
    """Error path of `_checked_utf8_lines`: name the first line that is not UTF-8."""
    path = _as_str(path.numpy())
    for line_number, line in zip(line_numbers.numpy(), lines.numpy()):
        error = _utf8_error(line)
        if error is not None:
            start = _byte_offset_of_line(path, int(line_number))
            raise _not_utf8(path, f"line {line_number}", start + error[0], error[1])
    raise AssertionError("no invalid UTF-8 line in the batch")  # Unreachable: checked in-graph.


def _is_utf8(texts):
    """In-graph: whether each string is valid UTF-8 (a strict transcode changes nothing)."""
    return tf.equal(
        texts, tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace")
    )


def _numbered_batches(dataset, first_number):
    """`(numbers, items)` batches of `PYTHON_BATCH` items with each item's number in its file
    (counted from `first_number`): per-batch work, no per-item `tf.data` step."""

    def number(batch_index, items):
        start = batch_index * PYTHON_BATCH + first_number
        return start + tf.range(tf.size(items, out_type=tf.int64)), items

    return dataset.batch(PYTHON_BATCH).enumerate().map(number)


def _checked_utf8_lines(path, numbered_batches, drop_blank_lines):
    """The lines of `numbered_batches`, checked for UTF-8 a batch at a time; the batch holding
    a bad line raises a `DataError` with the file, line and byte offset (a Python call made
    only then). Blank lines are dropped in the same step when `drop_blank_lines`."""

    def check(line_numbers, lines):
        lines = tf.cond(
            tf.reduce_all(_is_utf8(lines)),
            lambda: lines,
            lambda: tf.py_function(
                _raise_first_bad_line, [path, line_numbers, lines], Tout=tf.string
            ),
        )
        lines = tf.ensure_shape(lines, [None])
        return tf.boolean_mask(lines, _not_blank(lines)) if drop_blank_lines else lines

    return numbered_batches.map(check).unbatch()


def held_out_mask(documents, fraction, salt=""):
    """Whether each document is held out: its hash falls in the first `fraction` of buckets.

    The hash is `tf.strings.to_hash_bucket_fast` (FarmHash's 64-bit fingerprint, the same on
    every platform) of `salt + text` over `HELD_OUT_BUCKETS` buckets, so the split depends on a
    document's text only: not on its position, the shuffle, the sharding or the run, and a
    document repeated in the corpus is always on the same side. Another `salt` gives an
    independent split (the quality classifier's validation split uses one).

    Args:
        documents: `tf.string` tensor of any shape.
        fraction: float in [0, 1], the share held out (in steps of 1 / `HELD_OUT_BUCKETS`).
        salt: str prefixed to every document before hashing.

    Returns:
        A boolean tensor of the same shape.

    Example:

    >>> mask = held_out_mask(tf.constant([f"document {i}" for i in range(10000)]), 0.1)
    >>> 900 < int(tf.reduce_sum(tf.cast(mask, tf.int32))) < 1100
    True
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"The held-out fraction must be in [0, 1]. Received: {fraction!r}")
    if salt:
        documents = tf.strings.join([salt, documents])
    buckets = tf.strings.to_hash_bucket_fast(documents, HELD_OUT_BUCKETS)
    return buckets < round(fraction * HELD_OUT_BUCKETS)


def checkpointable(dataset):
    """`dataset` with the options that let `tf.train.Checkpoint(iterator=...)` save its
    iterator, and a deterministic order.

    Saving an iterator refuses functions that call Python (`tf.py_function`, the readers here)
    or hold resources (a tokenizer) unless told to ignore their state: here they are stateless,
    or keep their position in the pipeline's own state (`HuggingFaceDataset`).
    """
    options = tf.data.Options()
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    options.deterministic = True
    return dataset.with_options(options)


def _not_blank(text):
    return tf.strings.length(tf.strings.strip(text)) > 0


class DocumentSource:
    """A corpus readable as a `tf.data.Dataset` of scalar `tf.string` documents.

    Subclasses implement `documents`; `check` and `describe_error` have defaults.

    Attributes:
        name: str, how the source is named in messages and mixtures.
    """

    def __init__(self, name):
        self.name = name

    def documents(self, num_hosts=1, host_index=0, shuffle_seed=None):
        """This host's share of the documents, in a deterministic order.

        Args:
            num_hosts: int >= 1, hosts reading the corpus (e.g. `jax.process_count()`).
            host_index: int, this host (e.g. `jax.process_index()`).
            shuffle_seed: None reads the files once, in sorted order; an int reads them epoch
                after epoch, endlessly, each epoch in an order drawn from the seed and the
                epoch's number (so a saved iterator state restores it). Sources without files
                ignore it (and read once).

        Returns:
            A `tf.data.Dataset` of scalar `tf.string`.
        """
        raise NotImplementedError

    def first_documents(self, count, num_hosts=1, host_index=0):
        """What this host's first `count` documents give: a bounded read (a filtering source
        may give fewer)."""
        return self.documents(num_hosts, host_index).take(count)

    def check(self):
        """Read the start of the source and raise `DataError` for what is wrong there."""

    def describe_error(self, error):
        """A one-line message for a `tf.errors.OpError` raised while reading, or None."""
        return None

    # The attributes (format options) that decide the documents, for `identity`.
    identity_options = ()

    def identity(self):
        """What, besides the class and name, decides the documents and their order, as
        `{key: value}`; `repr` shows it (and a saved data stream records the `repr`)."""
        return {option: getattr(self, option) for option in self.identity_options}

    def __repr__(self):
        details = "".join(f", {key}={value!r}" for key, value in self.identity().items())
        return f"{type(self).__name__}(name={self.name!r}{details})"


def _check_host(num_hosts, host_index):
    if not (isinstance(num_hosts, int) and num_hosts >= 1 and 0 <= host_index < num_hosts):
        raise ValueError(
            "Need an integer `num_hosts` >= 1 and 0 <= `host_index` < `num_hosts`. "
            f"Received: num_hosts={num_hosts!r}, host_index={host_index!r}"
        )


class DocumentList(DocumentSource):
    """Documents held in memory (a list of `str`), e.g. the embedded Python documentation.

    Hosts get every `num_hosts`-th document.

    Args:
        documents: a list of `str`.
        name: the source's name.

    Example:

    >>> [d.decode() for d in DocumentList(["a", "b", "c"]).documents(2, 1).as_numpy_iterator()]
    ['b']
    """

    def __init__(self, documents, name="documents"):
        super().__init__(name)
        documents = list(documents)
        if not all(isinstance(document, str) for document in documents):
            raise TypeError(f"{name}: DocumentList takes a list of `str` documents.")
        self.document_list = documents

    def documents(self, num_hosts=1, host_index=0, shuffle_seed=None):
        _check_host(num_hosts, host_index)
        return checkpointable(
            tf.data.Dataset.from_tensor_slices(
                tf.constant(self.document_list[host_index::num_hosts], dtype=tf.string)
            )
        )

    def check(self):
        if not self.document_list:
            raise DataError(f"{self.name}: the document list is empty.")

    def identity(self):
        digest = hashlib.sha256()
        for document in self.document_list:
            digest.update(hashlib.sha256(document.encode("utf-8")).digest())
        return {"documents": len(self.document_list), "sha256": digest.hexdigest()[:16]}


class FileSource(DocumentSource):
    """Base of the file formats: globbing, sharding by file or element, interleaved reading.

    Args:
        paths: a path or glob pattern, or a list of them.
        name: the source's name (defaults to the first pattern).
        files_per_host: shard by whole files when there are at least this many files per host,
            else by element (every host reads every file and keeps its `num_hosts`-th share).
        files_read_at_once: files interleaved (read in parallel, deterministically).
    """

    def __init__(self, paths, name=None, files_per_host=4, files_read_at_once=4):
        first = paths if isinstance(paths, (str, os.PathLike)) else next(iter(paths), "")
        super().__init__(name or os.fspath(first))
        self.files = expand_paths(paths, self.name)
        self.files_per_host = files_per_host
        self.files_read_at_once = files_read_at_once
        self._listing = None  # A digest of the file names and sizes, once asked for.

    def shards_by_file(self, num_hosts):
        """Whether `documents(num_hosts, ...)` splits the files (rather than their elements)."""
        return num_hosts == 1 or len(self.files) >= self.files_per_host * num_hosts

    def documents(self, num_hosts=1, host_index=0, shuffle_seed=None):
        _check_host(num_hosts, host_index)
        by_file = self.shards_by_file(num_hosts)
        files = self.files[host_index::num_hosts] if by_file else self.files
        # Sharding by element needs every host to read the files in the same order: the same
        # seed on every host gives it.
        documents = _read_order(files, shuffle_seed).interleave(
            self.read_file,
            cycle_length=min(len(files), self.files_read_at_once),
            num_parallel_calls=min(len(files), self.files_read_at_once),
            deterministic=True,
        )
        if not by_file:
            documents = documents.shard(num_hosts, host_index)
        return checkpointable(documents)

    def read_file(self, path):
        """Documents of one file; `path` is a scalar `tf.string` tensor."""
        raise NotImplementedError

    def check(self):
        for path in self.files:
            self.check_file(path)

    def check_file(self, path):
        """Check the start of one file (a Python `str` path)."""

    def identity(self):
        if self._listing is None:
            listing = [(path, tf.io.gfile.stat(path).length) for path in sorted(self.files)]
            self._listing = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
        return {
            "files": len(self.files),
            "listing_sha256": self._listing,  # Names and sizes: not the contents (not read).
            "files_per_host": self.files_per_host,
            "files_read_at_once": self.files_read_at_once,
            **super().identity(),
        }


def _read_order(files, shuffle_seed):
    """A dataset of `files` (or one item per file) in their order, once; or, with a seed,
    epoch after epoch forever, each in its own order drawn from `(seed, epoch)`.

    The epochs are counted inside the pipeline (not `shuffle(reshuffle_each_iteration=True)`
    under a `repeat`, whose reshuffling a restored iterator does not continue), so a saved
    iterator state restores the order of every later epoch too.
    """
    if shuffle_seed is None:
        return tf.data.Dataset.from_tensor_slices(files)
    files = tf.constant(files)
    seed = tf.constant(shuffle_seed, tf.int64)

    def epoch_order(epoch):
        order = tf.random.experimental.stateless_shuffle(files, seed=tf.stack([seed, epoch]))
        return tf.data.Dataset.from_tensor_slices(order)

    return tf.data.Dataset.counter().flat_map(epoch_order)


class TextFiles(FileSource):
    """UTF-8 text files; documents are paragraphs, lines or whole files.

    Args:
        paths: a path or glob pattern, or a list of them.
        document_boundary: `"blank_line"` (paragraphs separated by blank lines, joined with
            `"\\n"`), `"line"` (every non-blank line) or `"file"` (each file whole; a file must
            fit in memory; not for `.gz`).
        name, files_per_host, files_read_at_once: see `FileSource`.

    Example:

    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> _ = path.write_text("One.\\n\\nTwo,\\nthree.\\n")
    >>> [d.decode() for d in TextFiles(str(path)).documents().as_numpy_iterator()]
    ['One.', 'Two,\\nthree.']
    """

    identity_options = ("document_boundary",)

    def __init__(self, paths, document_boundary="blank_line", **kwargs):
        if document_boundary not in DOCUMENT_BOUNDARIES:
            raise ValueError(
                f"`document_boundary` must be one of {DOCUMENT_BOUNDARIES}. "
                f"Received: document_boundary={document_boundary!r}"
            )
        super().__init__(paths, **kwargs)
        self.document_boundary = document_boundary
        if document_boundary == "file":
            compressed = [path for path in self.files if _compression(path)]
            if compressed:
                raise DataError(
                    f"{compressed[0]}: document_boundary='file' reads files whole and cannot "
                    "decompress them; decompress the file or use 'blank_line' or 'line'."
                )

    def read_file(self, path):
        if self.document_boundary == "file":
            return tf.data.Dataset.from_tensors(path).map(self._whole_file)
        lines = tf.data.TextLineDataset(path, compression_type=_text_compression(path))
        by_line = self.document_boundary == "line"
        lines = _checked_utf8_lines(path, _numbered_batches(lines, 1), drop_blank_lines=by_line)
        if by_line:
            return lines
        return paragraphs(lines.concatenate(tf.data.Dataset.from_tensors("")))

    def _whole_file(self, path):
        text = tf.io.read_file(path)
        lines = tf.strings.split(text, "\n")
        numbers = tf.range(1, tf.size(lines, out_type=tf.int64) + 1)
        return tf.cond(
            _is_utf8(text),
            lambda: text,
            lambda: tf.reshape(
                tf.py_function(_raise_first_bad_line, [path, numbers, lines], Tout=tf.string)[:1],
                [],
            ),
        )

    def check_file(self, path):
        with _open_binary(path) as file:
            prefix = file.read(CHECKED_PREFIX_BYTES)
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            decoder.decode(prefix)  # A character cut at the end of the prefix is not an error.
        except UnicodeDecodeError as error:
            bad_bytes = prefix[error.start : error.end]
            raise _not_utf8(path, "the file", error.start, bad_bytes) from None


def _text_compression(path):
    """`TextLineDataset`'s compression for a path tensor (".gz" means GZIP)."""
    return tf.where(tf.strings.regex_full_match(path, r".*\.gz"), "GZIP", "")


class JsonLines(FileSource):
    """JSON lines files: one JSON object per line, the document's text in `field`.

    Blank lines are skipped. A line that is not UTF-8, not JSON, or has no string `field` stops
    the stream with a `DataError` naming the file and line.

    Args:
        paths: a path or glob pattern, or a list of them.
        field: the key holding the text. Defaults to `"text"`.
        name, files_per_host, files_read_at_once: see `FileSource`.

    Example:

    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.jsonl"
    >>> _ = path.write_text('{"text": "One."}\\n{"text": "Two.", "id": 2}\\n')
    >>> [d.decode() for d in JsonLines(str(path)).documents().as_numpy_iterator()]
    ['One.', 'Two.']
    """

    identity_options = ("field",)

    def __init__(self, paths, field="text", **kwargs):
        super().__init__(paths, **kwargs)
        self.field = field

    def read_file(self, path):
        lines = tf.data.TextLineDataset(path, compression_type=_text_compression(path))

        def parse(numbers, batch):
            texts = tf.py_function(self._parse, [path, numbers, batch], Tout=tf.string)
            return tf.ensure_shape(texts, [None])

        return _numbered_batches(lines, 1).map(parse).unbatch()

    def _text_of(self, path, line_number, line):
        try:
            record = json.loads(line)  # Bytes: decoded as UTF-8, strictly.
        except UnicodeDecodeError:
            start = _byte_offset_of_line(path, line_number)
            position, bad_bytes = _utf8_error(line)
            raise _not_utf8(path, f"line {line_number}", start + position, bad_bytes) from None
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}: line {line_number} is not JSON ({error.msg} at column "
                f"{error.colno}). Repair the line or leave the file out."
            ) from None
        text = record.get(self.field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            found = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{path}: line {line_number} has no text field {self.field!r} (found: {found}). "
                "Name the field holding the text, e.g. jsonl,field=NAME:PATTERN "
                "(JsonLines(..., field=NAME))."
            )
        return text.encode("utf-8")

    def _parse(self, path, numbers, lines):
        """The texts of a batch of lines (blank lines skipped)."""
        path = _as_str(path.numpy())
        return np.array(
            [
                self._text_of(path, int(number), line)
                for number, line in zip(numbers.numpy(), lines.numpy())
                if line.strip()
            ],
            dtype=object,
        )

    def check_file(self, path):
        with _open_binary(path) as file:
            for number, line in enumerate(file, start=1):
                if line.strip():
                    self._text_of(path, number, line.rstrip(b"\r\n"))
                    return


class TFRecordFiles(FileSource):
    """TFRecord files of `tf.train.Example`s, the document's text in the bytes feature `field`.

    A record without the feature (or with several values in it), text that is not UTF-8, a
    corrupt record (failed checksum), or a file that ends inside a record stops the stream with
    a `DataError` naming the file, record and byte offset. `tf.data.TFRecordDataset` itself
    ends a file silently when it is cut inside a record's header, so the bytes the records span
    are compared with the file's at its end (a `.gz` file is decompressed a second time then).

    Args:
        paths: a path or glob pattern, or a list of them.
        field: the feature holding the text. Defaults to `"text"`.
        name, files_per_host, files_read_at_once: see `FileSource`.
    """

    identity_options = ("field",)

    def __init__(self, paths, field="text", **kwargs):
        super().__init__(paths, **kwargs)
        self.field = field

    def read_file(self, path):
        records = tf.data.TFRecordDataset(path, compression_type=_text_compression(path))

        def texts(numbers, serialized):
            feature = tf.io.parse_example(
                serialized, {self.field: tf.io.VarLenFeature(tf.string)}
            )[self.field]
            values_per_record = tf.math.bincount(
                tf.cast(feature.indices[:, 0], tf.int32), minlength=tf.size(serialized)
            )
            values = tf.sparse.to_dense(feature, default_value="")
            good = tf.reduce_all(tf.equal(values_per_record, 1)) & tf.reduce_all(
                _is_utf8(feature.values)
            )
            return tf.cond(
                good,
                lambda: values[:, 0],
                lambda: tf.py_function(
                    self._raise_bad_record, [path, numbers, serialized], Tout=tf.string
                ),
            )

        # `TFRecordDataset` ends silently at a record cut inside its 12-byte header, so the
        # records read must span the whole file: an empty batch (`batch` makes none) marks
        # the file's end, where the bytes they span are compared with the file's.
        end_of_file = tf.data.Dataset.from_tensors(
            (tf.zeros([0], tf.int64), tf.zeros([0], tf.string))
        )

        def spanned(records_and_offset, batch):
            numbers, serialized = batch
            records_read, offset = records_and_offset
            serialized = tf.cond(
                tf.size(serialized) > 0,
                lambda: serialized,
                lambda: tf.py_function(
                    _check_tfrecord_end, [path, records_read, offset], Tout=tf.string
                ),
            )
            lengths = tf.cast(tf.strings.length(serialized), tf.int64) + TFRECORD_FRAMING_BYTES
            state = (
                records_read + tf.size(serialized, out_type=tf.int64),
                offset + tf.reduce_sum(lengths),
            )
            return state, (numbers, tf.ensure_shape(serialized, [None]))

        zero = tf.constant(0, tf.int64)
        return (
            _numbered_batches(records, 0)
            .concatenate(end_of_file)
            .scan((zero, zero), spanned)
            .filter(lambda numbers, batch: tf.size(batch) > 0)
            .map(lambda numbers, batch: tf.ensure_shape(texts(numbers, batch), [None]))
            .unbatch()
        )

    def _check_record(self, path, number, serialized):
        example = tf.train.Example.FromString(serialized)
        feature = example.features.feature.get(self.field)
        values = list(feature.bytes_list.value) if feature is not None else []
        if len(values) != 1:
            found = ", ".join(sorted(example.features.feature)) or "none"
            problem = f"has {len(values)} values in" if feature is not None else "has no"
            raise DataError(
                f"{path}: record {number} {problem} bytes feature {self.field!r} (features: "
                f"{found}). Name the feature holding the text, e.g. "
                "tfrecord,field=NAME:PATTERN (TFRecordFiles(..., field=NAME))."
            )
        error = _utf8_error(values[0])
        if error is not None:
            raise _not_utf8(path, f"record {number} ({self.field!r})", error[0], error[1])

    def _raise_bad_record(self, path, numbers, records):
        path = _as_str(path.numpy())
        for number, serialized in zip(numbers.numpy(), records.numpy()):
            self._check_record(path, int(number), serialized)
        raise AssertionError("no bad record in the batch")  # Unreachable: checked in-graph.

    def check(self):
        """Reads the first record of every file, and walks the record lengths of every
        uncompressed file to its end (12 bytes read per record; `.gz` files are read whole
        while streaming): a file cut short (a truncated last record) is found before
        training."""

        def first_record(path):
            records = tf.data.TFRecordDataset(path, _text_compression(path))
            none = tf.data.Dataset.from_tensors((False, tf.constant(b"")))
            return records.map(lambda record: (True, record)).concatenate(none).take(1)

        firsts = iter(tf.data.Dataset.from_tensor_slices(self.files).flat_map(first_record))
        for path in self.files:
            if not _compression(path):
                cut = _tfrecord_cut_record(path)
                if cut is not None:
                    raise _damaged_tfrecord(path, "truncated", *cut)
            try:
                found, serialized = (value.numpy() for value in next(firsts))
            except tf.errors.OpError as error:
                damage = _TFRECORD_DATA_LOSS.search(str(error))
                if damage is not None:
                    raise _damaged_tfrecord(path, damage[1], 0, 0) from None
                raise DataError(
                    f"{path}: not a readable TFRecord shard ({error.message.splitlines()[0]}). "
                    "Re-create the shard or leave it out."
                ) from None
            if not found:
                raise DataError(f"{path}: the TFRecord shard holds no record. Leave it out.")
            try:
                self._check_record(path, 0, serialized)
            except DataError:
                raise
            except Exception as error:  # A protobuf DecodeError: not an Example.
                raise DataError(
                    f"{path}: record 0 is not a tf.train.Example ({error}). Re-create the shard."
                ) from None

    def describe_error(self, error):
        damage = _TFRECORD_DATA_LOSS.search(str(error))
        if not isinstance(error, tf.errors.DataLossError) or damage is None:
            return None
        kind, offset = damage[1], int(damage[2])
        for path in self.files:
            if _compression(path) or tf.io.gfile.stat(path).length > offset:
                found = _first_tfrecord_damage(path)
                if found is not None and found[0] == kind and found[3] == offset:
                    return str(_damaged_tfrecord(path, *found[:3]))
        adjective = "corrupt" if kind == "corrupted" else kind
        return f"{self.name}: a TFRecord shard is {adjective} (record at byte {offset})."


def _damaged_tfrecord(path, kind, number, offset):
    problem = {
        "corrupted": f"corrupt TFRecord shard: record {number} (at byte {offset}) fails its "
        "checksum",
        "truncated": f"truncated TFRecord shard: the file ends inside record {number} (at byte "
        f"{offset})",
    }[kind]
    return DataError(f"{path}: {problem}. Re-create the shard or leave it out.")


def _stream_length(path):
    """Bytes of a file's content: its size, or what a `.gz` file decompresses to."""
    if not _compression(path):
        return tf.io.gfile.stat(path).length
    with _open_binary(path) as file:
        return sum(len(chunk) for chunk in iter(lambda: file.read(1 << 20), b""))


def _check_tfrecord_end(path, records_read, offset):
    """End-of-file step of `TFRecordFiles.read_file`: raise unless the `records_read` records
    read span the whole file (`offset` bytes); returns no record."""
    path, offset = _as_str(path.numpy()), int(offset.numpy())
    try:
        length = _stream_length(path)
    except (EOFError, OSError) as error:  # gzip's words for a cut or damaged .gz file.
        raise DataError(
            f"{path}: the gzip file is damaged ({error}). Re-create the shard or leave it out."
        ) from None
    if length != offset:
        raise _damaged_tfrecord(path, "truncated", int(records_read.numpy()), offset)
    return np.array([], dtype=object)


def _tfrecord_cut_record(path):
    """`(number, offset)` of the record an uncompressed TFRecord file ends inside (found from
    the records' lengths, a header read per record), or None when the records fill the file."""
    size = tf.io.gfile.stat(path).length
    number = offset = 0
    with tf.io.gfile.GFile(path, "rb") as file:
        buffer_start, buffer = 0, b""
        while offset < size:
            if size - offset < TFRECORD_HEADER_BYTES:
                return number, offset
            if offset + 8 > buffer_start + len(buffer):  # GFile reads are slow: read ahead.
                file.seek(offset)
                buffer_start, buffer = offset, file.read(HEADER_READ_BYTES)
            start = offset - buffer_start
            length = int.from_bytes(buffer[start : start + 8], "little")
            if offset + TFRECORD_FRAMING_BYTES + length > size:
                return number, offset
            offset += TFRECORD_FRAMING_BYTES + length
            number += 1
    return None


def _first_tfrecord_damage(path):
    """`(kind, number, offset, reported_offset)` of the first record `TFRecordDataset` cannot
    read in a file (reading it whole): "corrupted" or "truncated", the record's number and
    byte offset, and the offset `TFRecordDataset`'s error names (the record's data, for a
    failed data checksum). None when every record reads."""
    number = offset = 0
    try:
        for record in tf.data.TFRecordDataset(path, _compression(path)):
            number += 1
            offset += len(record.numpy()) + TFRECORD_FRAMING_BYTES
    except tf.errors.DataLossError as error:
        damage = _TFRECORD_DATA_LOSS.search(str(error))
        if damage is not None:
            return damage[1], number, offset, int(damage[2])
    return None


class ParquetFiles(FileSource):
    """Parquet files, one row per document, the text in the string column `field`.

    Each file's footer is read when the source is built (a corrupt or truncated file, or a
    missing column, is reported then), and `check()` reads each file's first slice. Rows are
    read `rows_per_read` at a time from one row group (`pyarrow`), so memory holds a slice, not
    a file; host sharding splits files, or, with fewer files than hosts, the slices. Pages
    written with checksums (`write_page_checksum=True`) are verified as they are read, so a
    damaged page is named (file and row group) instead of giving wrong text.

    Args:
        paths: a path or glob pattern, or a list of them.
        field: the column holding the text. Defaults to `"text"`.
        rows_per_read: rows per read. Defaults to 256.
        name, files_per_host: see `FileSource`.
    """

    identity_options = ("field", "rows_per_read")

    def __init__(self, paths, field="text", rows_per_read=PYTHON_BATCH, **kwargs):
        import pyarrow.parquet

        super().__init__(paths, **kwargs)
        self.field = field
        self.rows_per_read = rows_per_read
        slices = []
        for file_index, path in enumerate(self.files):
            try:
                metadata = pyarrow.parquet.ParquetFile(path).metadata
            except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ...
                raise DataError(
                    f"{path}: not a readable Parquet file ({error}). Re-create the file or leave "
                    "it out."
                ) from None
            schema = metadata.schema.to_arrow_schema()
            if field not in schema.names or not _is_arrow_string(schema.field(field).type):
                raise DataError(
                    f"{path}: no string column {field!r} (columns: {', '.join(schema.names)}). "
                    "Name the column holding the text, e.g. parquet,field=NAME:PATTERN "
                    "(ParquetFiles(..., field=NAME))."
                )
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                for start in range(0, rows, rows_per_read):
                    slices.append((file_index, group, start, min(rows_per_read, rows - start)))
        self.slices = np.array(slices, dtype=np.int64).reshape(-1, 4)

    def documents(self, num_hosts=1, host_index=0, shuffle_seed=None):
        _check_host(num_hosts, host_index)
        slices = self.slices
        if self.shards_by_file(num_hosts):
            slices = slices[slices[:, 0] % num_hosts == host_index]
        else:
            slices = slices[host_index::num_hosts]
        # The slices of each file lie together: `[start, end)` of each file's, in file order.
        _, starts = np.unique(slices[:, 0], return_index=True)
        spans = np.stack([starts, np.append(starts[1:], len(slices))], axis=1)
        all_slices = tf.constant(slices)
        units = _read_order(spans, shuffle_seed).flat_map(
            lambda span: tf.data.Dataset.from_tensor_slices(all_slices[span[0] : span[1]])
        )
        reader = _ParquetSliceReader(self)
        read = lambda s: tf.ensure_shape(tf.py_function(reader.read, [s], Tout=tf.string), [None])
        documents = (
            units.map(read)  # Sequential: the reader keeps one row group open.
            .prefetch(2)
            .unbatch()
        )
        return checkpointable(documents)

    def check(self):
        reader = _ParquetSliceReader(self)
        _, first_slice_of_each_file = np.unique(self.slices[:, 0], return_index=True)
        for unit in self.slices[first_slice_of_each_file]:
            reader.texts(*(int(value) for value in unit))


class _ParquetSliceReader:
    """Reads the row slices of one `ParquetFiles.documents` pipeline.

    Slices come in order, so one open batch iterator per row group serves them all; any other
    request (a resumed stream) reopens the row group and skips to the slice.
    """

    def __init__(self, source):
        self.source = source
        self.position = None  # (file_index, group, next_start)
        self.batches = None

    def read(self, unit):
        return self.texts(*(int(value) for value in unit.numpy()))

    def texts(self, file_index, group, start, length):
        """The UTF-8 texts of one slice, or a `DataError` naming the file and row group."""
        path = self.source.files[file_index]
        try:
            texts = self._rows(file_index, group, start, length)
        except Exception as error:  # pyarrow's errors for corrupt pages.
            self.position = None
            reason = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise DataError(
                f"{path}: row group {group} (rows {start}-{start + length - 1}) is unreadable "
                f"({reason}). Re-create the file or leave it out."
            ) from None
        return np.array([text.encode("utf-8") if text else b"" for text in texts], dtype=object)

    def _rows(self, file_index, group, start, length):
        import pyarrow.parquet

        rows_per_read = self.source.rows_per_read
        if self.position != (file_index, group, start):
            parquet_file = pyarrow.parquet.ParquetFile(
                self.source.files[file_index], page_checksum_verification=True
            )
            batches = parquet_file.iter_batches(
                batch_size=rows_per_read, row_groups=[group], columns=[self.source.field]
            )
            self.batches = itertools.islice(batches, start // rows_per_read, None)
        texts = next(self.batches).column(0).to_pylist()
        if len(texts) != length:
            raise ValueError(f"expected {length} rows, read {len(texts)}")
        self.position = (file_index, group, start + length)
        return texts


def _is_arrow_string(arrow_type):
    import pyarrow

    return pyarrow.types.is_string(arrow_type) or pyarrow.types.is_large_string(arrow_type)


class HuggingFaceDataset(DocumentSource):
    """A Hugging Face `datasets.Dataset` or `datasets.IterableDataset` (`streaming=True`).

    A `Dataset` (Arrow files, memory-mapped) is read `PYTHON_BATCH` rows at a time by index; an
    `IterableDataset` is read in order, and its position (`state_dict()`, Hugging Face's own
    resumable state) travels inside the `tf.data` pipeline, so that saving the pipeline's
    iterator saves the position too, and a restored iterator reopens the stream there instead
    of reading it again. Hosts get `datasets.distributed.split_dataset_by_node` shares
    (by shard when the shards divide evenly, else by example) or every `num_hosts`-th block
    of rows.

    Args:
        dataset: a `datasets.Dataset` or `datasets.IterableDataset`.
        field: the column holding the text. Defaults to `"text"`.
        name: the source's name. Defaults to the dataset's `info.dataset_name` or `"hf"`.

    Example:

    >>> import datasets
    >>> corpus = datasets.Dataset.from_dict({"text": ["One.", "Two."]})
    >>> [d.decode() for d in HuggingFaceDataset(corpus).documents().as_numpy_iterator()]
    ['One.', 'Two.']
    """

    identity_options = ("field", "streaming")

    def __init__(self, dataset, field="text", name=None):
        import datasets

        if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
            raise TypeError(
                "`dataset` must be a datasets.Dataset or datasets.IterableDataset; got "
                f"{type(dataset).__name__}. For a DatasetDict pick a split: dataset['train']."
            )
        info_name = getattr(getattr(dataset, "info", None), "dataset_name", None)
        super().__init__(name or info_name or "hf")
        self.dataset = dataset
        self.field = field
        self.streaming = isinstance(dataset, datasets.IterableDataset)
        columns = dataset.column_names
        if columns is not None and field not in columns:
            raise DataError(
                f"{self.name}: no column {field!r} in the Hugging Face dataset (columns: "
                f"{', '.join(columns)}). Name the column holding the text with field=NAME."
            )

    def identity(self):
        info = getattr(self.dataset, "info", None)
        described = {
            "dataset": getattr(info, "dataset_name", None),
            "config": getattr(info, "config_name", None),
            "split": str(self.dataset.split),
        }
        if not self.streaming:
            described["rows"] = len(self.dataset)
        return {**super().identity(), **described}

    def documents(self, num_hosts=1, host_index=0, shuffle_seed=None):
        _check_host(num_hosts, host_index)
        if self.streaming:
            return self._streamed(num_hosts, host_index)
        starts = np.arange(0, len(self.dataset), PYTHON_BATCH, dtype=np.int64)
        starts = starts[host_index::num_hosts]
        read = lambda start: tf.ensure_shape(
            tf.py_function(self._read_rows, [start], Tout=tf.string), [None]
        )
        return checkpointable(
            tf.data.Dataset.from_tensor_slices(starts).map(read).prefetch(2).unbatch()
        )

    def _read_rows(self, start):
        start = int(start.numpy())
        rows = self.dataset[start : start + PYTHON_BATCH][self.field]
        texts = [self.encoded_text(text, start + i) for i, text in enumerate(rows)]
        return np.array(texts, dtype=object)

    def encoded_text(self, text, index):
        """The UTF-8 bytes of example `index`'s text column (`b""` for None), or a DataError."""
        if text is None:
            return b""
        if not isinstance(text, str):
            raise DataError(
                f"{self.name}: example {index} has a {type(text).__name__} in column "
                f"{self.field!r}, not text. Name the text column with field=NAME."
            )
        return text.encode("utf-8")

    def _streamed(self, num_hosts, host_index):
        from datasets.distributed import split_dataset_by_node

        dataset = self.dataset
        if num_hosts > 1:
            dataset = split_dataset_by_node(dataset, rank=host_index, world_size=num_hosts)
        reader = _StreamReader(dataset, self)

        def read_block(state, block_index):
            texts, next_state = tf.py_function(
                reader.read, [block_index, state], Tout=(tf.string, tf.string)
            )
            return tf.ensure_shape(next_state, []), tf.ensure_shape(texts, [None])

        # The scan's state, the stream's position after the last block read, is saved with
        # the iterator; a block index the reader does not expect makes it reopen the stream
        # at that position (an empty state: at the start).
        return checkpointable(
            tf.data.Dataset.counter()
            .scan(tf.constant(""), read_block)
            .take_while(lambda texts: tf.size(texts) > 0)
            .unbatch()
        )

    def check(self):
        if not self.streaming and len(self.dataset) == 0:
            raise DataError(f"{self.name}: the Hugging Face dataset is empty.")
        if self.streaming and self.dataset.column_names is None:
            example = next(iter(copy.deepcopy(self.dataset)), None)
            if example is None:
                raise DataError(f"{self.name}: the Hugging Face dataset is empty.")
            if self.field not in example:
                raise DataError(
                    f"{self.name}: no field {self.field!r} in the Hugging Face dataset's "
                    f"examples (found: {', '.join(example)}). Name it with field=NAME."
                )


class _StreamReader:
    """Reads blocks of an `IterableDataset` in order for one `HuggingFaceDataset._streamed`
    pipeline (on its own copy of the dataset, whose `state_dict()` follows this reader only)."""

    def __init__(self, dataset, source):
        self.dataset = copy.deepcopy(dataset)
        self.source = source
        self.initial_state = self.dataset.state_dict()
        self.iterator = None
        self.next_block = None
        self.examples_read = 0

    def read(self, block_index, state):
        block_index = int(block_index.numpy())
        if self.iterator is None or block_index != self.next_block:
            state = json.loads(state.numpy().decode() or "null")
            self.dataset.load_state_dict(state["stream"] if state else self.initial_state)
            self.examples_read = state["examples_read"] if state else 0
            self.iterator = iter(self.dataset)
        texts = []
        for example in itertools.islice(self.iterator, PYTHON_BATCH):
            if self.source.field not in example:
                raise DataError(
                    f"{self.source.name}: example {self.examples_read} has no field "
                    f"{self.source.field!r} (found: {', '.join(example)}). Name it with "
                    "field=NAME."
                )
            texts.append(self.source.encoded_text(example[self.source.field], self.examples_read))
            self.examples_read += 1
        self.next_block = block_index + 1
        state = {"stream": self.dataset.state_dict(), "examples_read": self.examples_read}
        return np.array(texts, dtype=object), json.dumps(state)


def describe_data_error(error, sources=()):
    """The one-line message of a `DataError` raised inside a `tf.data` pipeline, or of a read
    error a source can explain (a corrupt TFRecord shard), else None.

    `tf.data` wraps Python exceptions raised by `tf.py_function` in a `tf.errors.OpError` whose
    text holds `DataError: <message>` and a traceback.
    """
    match = re.search(r"DataError: (.*)", str(error))
    if match:
        return match[1].strip()
    for source in sources:
        message = source.describe_error(error)
        if message:
            return message
    return None


def source_summary(source):
    """`name (Format, N files)`: a source as one phrase for logs."""
    files = getattr(source, "files", None)
    where = f", {len(files)} file{'s' * (len(files) != 1)}" if files is not None else ""
    return f"{source.name} ({type(source).__name__}{where})"


FORMAT_CLASSES = collections.OrderedDict(
    [
        ("text", TextFiles),
        ("jsonl", JsonLines),
        ("parquet", ParquetFiles),
        ("tfrecord", TFRecordFiles),
    ]
)
EXTENSION_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".tfrecord": "tfrecord",
    ".tfrecords": "tfrecord",
}


def format_of_path(path):
    """The file format a path's extension implies (`.gz` looked through), default `"text"`."""
    stem = path[: -len(".gz")] if path.endswith(".gz") else path
    return EXTENSION_FORMATS.get(os.path.splitext(stem)[1].lower(), "text")


def load_hugging_face(path, name=None, split="train", streaming=False, **kwargs):
    """`datasets.load_dataset(path, name, split=split, streaming=streaming, **kwargs)` with
    a one-line `DataError` when it cannot be loaded."""
    import datasets

    try:
        return datasets.load_dataset(path, name, split=split, streaming=streaming, **kwargs)
    except Exception as error:  # `datasets` raises many kinds (even StopIteration) here.
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else type(error).__name__
        raise DataError(
            f"hf:{path}: cannot load the Hugging Face dataset ({first_line}). Check the name, "
            "split and data_files, or set HF_DATASETS_OFFLINE=1 with a local copy."
        ) from None


__all__ = [
    "DataError",
    "DocumentList",
    "DocumentSource",
    "FileSource",
    "HuggingFaceDataset",
    "JsonLines",
    "ParquetFiles",
    "TFRecordFiles",
    "TextFiles",
    "describe_data_error",
    "expand_paths",
    "checkpointable",
    "format_of_path",
    "held_out_mask",
    "load_hugging_face",
]
