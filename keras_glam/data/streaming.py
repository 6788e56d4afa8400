"""GLaM's training input, streamed end to end, with a position saved in every checkpoint.

From `--data` specs (one or more named sources) and a `--mixture` of weights to batches of
packed causal-LM examples, everything runs inside `tf.data`: files are read a few at a time in
parallel, tokenised in-graph (a `keras_hub` / tensorflow-text tokenizer, parallel `map`),
packed into rows (`keras_glam.data.packing`), shuffled, mixed by weight, batched and
prefetched. Nothing holds the corpus in Python: memory holds the shuffle buffers.

- **Held-out split** by a hash of each document's text (`sources.held_out_mask`): the same
  documents are held out whatever the order, sharding or run. The held-out set is the first
  `held_out_documents` held-out documents of the sources (shared out by weight), so building
  it reads about `held_out_documents / held_out_fraction` documents, not the corpus.
- **Unigram baseline** from a bounded sample: the token frequencies of the first
  `baseline_tokens` training targets.
- **Hosts** read disjoint shares: whole files when there are enough (see
  `sources.FileSource`), else every `num_hosts`-th element.
- **Resume without re-reading**: `DataIterator` saves the `tf.data` iterator's state
  (`tf.train.Checkpoint(iterator=...)`: read positions, shuffle buffers, random states), plus
  the few batches already handed to Keras but not yet trained on, into the checkpoint
  directory; restoring continues the stream exactly where the checkpoint was taken.

`--data` specs (`parse_data_spec`): `[NAME=][FORMAT[,KEY=VALUE...]:]LOCATION`, e.g.

    shards/*.jsonl                                   (format from the extension, name "data")
    web=jsonl,field=content,quality=filter.keras:crawl/*.jsonl.gz
    wikipedia=parquet:wiki/*.parquet
    books=tfrecord,field=text:books/*.tfrecord
    news=hf,split=train,streaming=true:cc_news      (a Hugging Face dataset)
    forums=hf,data_files=forums/*.jsonl:json        (a local file through `datasets`)
    docs=text,boundary=line:notes/*.txt

Formats: `text` (option `boundary`: blank_line, line, file), `jsonl`, `parquet`, `tfrecord`
(option `field`, default `text`), `hf` (options `field`, `split` (train), `config`,
`streaming` (false), `data_files`, `revision`). Every format takes `quality=PATH` (a
`QualityClassifier` saved by `glam-data train-filter`: the source is filtered by GLaM's rule as
it streams) and `alpha=` (the rule's Pareto shape, 9). Specs with the same name are one source
(their files together; same format and options).

`--mixture NAME=WEIGHT,...` (`parse_mixture`) weights the named sources by their share of
training tokens (rows). GLaM's own mixture over its six sources (`GLAM_MIXTURE`) reads:

    --mixture web=0.42,wikipedia=0.06,conversations=0.28,forums=0.02,books=0.20,news=0.02
"""

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import threading

import numpy as np
import tensorflow as tf

from keras_glam.data import sources as sources_lib
from keras_glam.data.packing import pack_documents
from keras_glam.data.packing import packed_lm_dataset
from keras_glam.data.quality import DEFAULT_ALPHA
from keras_glam.data.quality import FilteredSource
from keras_glam.data.quality import load_quality_classifier
from keras_glam.data.sources import DataError

# GLaM's data mixture (Du et al. 2021, table 3): weights of filtered web pages, Wikipedia,
# conversations, forums, books and news, as shares of training tokens.
GLAM_MIXTURE = {
    "web": 0.42,
    "wikipedia": 0.06,
    "conversations": 0.28,
    "forums": 0.02,
    "books": 0.20,
    "news": 0.02,
}
DEFAULT_SOURCE_NAME = "data"
FORMATS = (*sources_lib.FORMAT_CLASSES, "hf")
_COMMON_OPTIONS = ("quality", "alpha")
FORMAT_OPTIONS = {
    "text": ("boundary",),
    "jsonl": ("field",),
    "parquet": ("field",),
    "tfrecord": ("field",),
    "hf": ("field", "split", "config", "streaming", "data_files", "revision"),
}
_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)=(?!=)")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """One `--data` spec: a named source's format, location and options.

    Attributes:
        name: str, the source's name (specs sharing a name form one source).
        format: one of `FORMATS`.
        location: a path or glob pattern (files), or a dataset path or name (`hf`).
        options: tuple of `(key, value)` string pairs, sorted.
    """

    name: str
    format: str
    location: str
    options: tuple = ()

    def option(self, key, default=None):
        return dict(self.options).get(key, default)


def parse_data_spec(text):
    """Parses `[NAME=][FORMAT[,KEY=VALUE...]:]LOCATION` (see the module docstring).

    Without a format, it is taken from the location's extension (`.jsonl`, `.parquet`,
    `.tfrecord`, ... with `.gz` looked through; anything else is text).

    Example:

    >>> parse_data_spec("web=jsonl,field=content:crawl/*.jsonl")
    DataSpec(name='web', format='jsonl', location='crawl/*.jsonl', options=(('field', 'content'),))
    >>> parse_data_spec("shards/*.parquet").format
    'parquet'

    Raises:
        DataError: an unknown option or format, an empty location.
    """
    rest = text.strip()
    name = DEFAULT_SOURCE_NAME
    match = _NAME.match(rest)
    if match and not os.path.exists(rest):
        name, rest = match[1], rest[match.end() :]
    head, colon, tail = rest.partition(":")
    head_parts = head.split(",")
    if colon and head_parts[0] in FORMATS:
        format_name, location = head_parts[0], tail
        options = []
        for part in head_parts[1:]:
            key, equals, value = part.partition("=")
            allowed = FORMAT_OPTIONS[format_name] + _COMMON_OPTIONS
            if not equals or key not in allowed:
                raise DataError(
                    f"--data {text!r}: {part!r} is not an option of format {format_name!r} "
                    f"(options: {', '.join(f'{o}=...' for o in allowed)})."
                )
            options.append((key, value))
        options = tuple(sorted(options))
    else:
        format_name = sources_lib.format_of_path(rest)
        location, options = rest, ()
    if not location:
        raise DataError(f"--data {text!r}: no path, glob pattern or dataset after the format.")
    return DataSpec(name, format_name, location, options)


def parse_mixture(text):
    """Parses `NAME=WEIGHT,...` into `{name: weight}` (weights need not sum to 1).

    Example:

    >>> parse_mixture("web=0.42,books=0.2")
    {'web': 0.42, 'books': 0.2}

    Raises:
        DataError: a malformed entry, a repeated name, a negative or non-finite weight, or
            weights that sum to 0.
    """
    weights = {}
    for part in text.split(","):
        name, equals, value = (piece.strip() for piece in part.partition("="))
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not equals or not name or weight is None:
            raise DataError(
                f"--mixture {text!r}: {part!r} is not NAME=WEIGHT (e.g. "
                "web=0.42,wikipedia=0.06)."
            )
        if name in weights:
            raise DataError(f"--mixture {text!r}: source {name!r} is weighted twice.")
        if not math.isfinite(weight) or weight < 0:
            raise DataError(
                f"--mixture: the weight of {name!r} is {value}; weights must be finite and >= 0."
            )
        weights[name] = weight
    if sum(weights.values()) <= 0:
        raise DataError(f"--mixture {text!r}: the weights sum to 0; give a source a weight > 0.")
    return weights


def _boolean_option(spec, key, default):
    value = spec.option(key)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise DataError(f"--data {spec.name}: {key}={value!r} is not true or false.")


def build_source(specs, document_boundary="blank_line", seed=0):
    """The `DocumentSource` of the specs sharing one name (their files together).

    Args:
        specs: a list of `DataSpec` with the same name, format and options.
        document_boundary: text files' boundary when a spec has no `boundary=` option.
        seed: seeds the quality filter's draws (when a spec has `quality=`).

    Raises:
        DataError: specs that disagree, missing files, unreadable files or filter.
    """
    first = specs[0]
    for spec in specs[1:]:
        if (spec.format, spec.options) != (first.format, first.options):
            raise DataError(
                f"--data: the specs named {first.name!r} differ in format or options "
                f"({first.format}{dict(first.options)} vs {spec.format}{dict(spec.options)}). "
                "Give them different names and weigh them with --mixture."
            )
    locations = [spec.location for spec in specs]
    field = first.option("field", "text")
    if first.format == "hf":
        if len(specs) > 1:
            raise DataError(
                f"--data: {len(specs)} Hugging Face specs are named {first.name!r}; give each "
                "its own name."
            )
        extra = {"revision": first.option("revision")} if first.option("revision") else {}
        if first.option("data_files"):
            extra["data_files"] = first.option("data_files")
        dataset = sources_lib.load_hugging_face(
            first.location,
            first.option("config"),
            split=first.option("split", "train"),
            streaming=_boolean_option(first, "streaming", False),
            **extra,
        )
        source = sources_lib.HuggingFaceDataset(dataset, field=field, name=first.name)
    elif first.format == "text":
        boundary = first.option("boundary", document_boundary)
        if boundary not in sources_lib.DOCUMENT_BOUNDARIES:
            raise DataError(
                f"--data {first.name}: boundary={boundary!r} is not one of "
                f"{', '.join(sources_lib.DOCUMENT_BOUNDARIES)}."
            )
        source = sources_lib.TextFiles(locations, document_boundary=boundary, name=first.name)
    else:
        source_class = sources_lib.FORMAT_CLASSES[first.format]
        source = source_class(locations, field=field, name=first.name)
    if first.option("quality"):
        try:
            alpha = float(first.option("alpha", DEFAULT_ALPHA))
            classifier = load_quality_classifier(first.option("quality"))
        except ValueError as error:
            raise DataError(f"--data {first.name}: quality filter: {error}") from None
        source = FilteredSource(source, classifier, alpha=alpha, seed=seed)
    return source


def sources_from_specs(specs, document_boundary="blank_line", seed=0):
    """`DocumentSource`s of `--data` specs (strings or `DataSpec`s), one per name, in the order
    names first appear."""
    grouped = collections.OrderedDict()
    for spec in specs:
        spec = parse_data_spec(spec) if isinstance(spec, str) else spec
        grouped.setdefault(spec.name, []).append(spec)
    return [build_source(group, document_boundary, seed) for group in grouped.values()]


def mixture_weights(source_names, mixture=None):
    """One weight per source, in order, from `--mixture`'s `{name: weight}` (None: equal).

    Raises:
        DataError: the mixture names a source that does not exist, or leaves one out.
    """
    if mixture is None:
        return [1.0] * len(source_names)
    unknown = [name for name in mixture if name not in source_names]
    if unknown:
        raise DataError(
            f"--mixture names {', '.join(map(repr, unknown))}, which no --data spec defines "
            f"(sources: {', '.join(source_names)}). Name the specs NAME=...:PATH."
        )
    missing = [name for name in source_names if name not in mixture]
    if missing:
        raise DataError(
            f"--mixture gives no weight to {', '.join(map(repr, missing))}: weigh every "
            "source (0 leaves it out)."
        )
    return [mixture[name] for name in source_names]


def pad_batches(dataset, batch_size):
    """Pads a short last batch of `(x, y, sample_weight)` with empty rows (padding mask and
    weight 0), so that every batch has the same shape (one compiled evaluation)."""

    def pad(x, y, sample_weight):
        paddings = [[0, batch_size - tf.shape(y)[0]], [0, 0]]

        def fill(tensor):
            return tf.ensure_shape(tf.pad(tensor, paddings), [batch_size, tensor.shape[1]])

        return {name: fill(value) for name, value in x.items()}, fill(y), fill(sample_weight)

    return dataset.map(pad)


def unigram_cross_entropy(train_counts, held_out):
    """Held-out cross-entropy (nats/token) of the add-one-smoothed unigram model of
    `train_counts` (token frequencies, `[vocabulary_size]`), over exactly the targets and
    weights of the held-out loss (`(x, y, sample_weight)` batches)."""
    log_probability = np.log((train_counts + 1.0) / (train_counts.sum() + len(train_counts)))
    total, weight = 0.0, 0.0
    for _, labels, sample_weight in held_out.as_numpy_iterator():
        total -= float(np.sum(log_probability[labels] * sample_weight))
        weight += float(np.sum(sample_weight))
    return total / weight


class StreamingData:
    """GLaM's training and held-out input from named document sources.

    Args:
        sources: a list of `keras_glam.data.sources.DocumentSource` with distinct names.
        tokenizer: maps a scalar `tf.string` to token ids inside `tf.data`, with
            `end_token_id` and `vocabulary_size()` (e.g. `GLaMTokenizer`).
        weights: one weight per source (shares of training tokens), or None for equal.
        sequence_length: tokens per row.
        batch_size: rows per batch (per host).
        held_out_fraction: share of documents held out, by hash, in (0, 1).
        held_out_documents: documents in the held-out set (over all sources, by weight).
        shuffle_buffer: documents, and then rows, in each source's shuffle buffers. The
            iterator's checkpoint holds these buffers: larger means better mixing and larger
            checkpoints.
        num_hosts: hosts reading the data (e.g. `jax.process_count()`).
        host_index: this host (e.g. `jax.process_index()`).

    Example:

    >>> import keras_glam
    >>> tokenizer = keras_glam.GLaMTokenizer.from_preset("glam_tiny_8e")
    >>> data = StreamingData(
    ...     [sources_lib.DocumentList([f"Document {i} is short." for i in range(50)])],
    ...     tokenizer, sequence_length=16, batch_size=2, held_out_fraction=0.2)
    >>> x, y, sample_weight = next(data.training_iterator(seed=0))
    >>> x["token_ids"].shape
    (2, 16)
    """

    def __init__(
        self,
        sources,
        tokenizer,
        weights=None,
        sequence_length=1024,
        batch_size=8,
        held_out_fraction=0.1,
        held_out_documents=1000,
        shuffle_buffer=1000,
        num_hosts=1,
        host_index=0,
    ):
        names = [source.name for source in sources]
        if not sources or len(set(names)) != len(names):
            raise ValueError(f"Need one or more sources with distinct names; got {names}.")
        if not 0.0 < held_out_fraction < 1.0:
            raise ValueError(
                f"The held-out fraction must be in (0, 1). Received: {held_out_fraction!r}"
            )
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources) or sum(weights) <= 0 or min(weights) < 0:
            raise ValueError(
                f"Need one non-negative weight per source with a positive sum; got {weights}."
            )
        self.sources = list(sources)
        self.weights = [w / sum(weights) for w in weights]
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length
        self.batch_size = batch_size
        self.held_out_fraction = held_out_fraction
        self.held_out_documents = held_out_documents
        self.shuffle_buffer = shuffle_buffer
        self.num_hosts = num_hosts
        self.host_index = host_index

    @classmethod
    def from_specs(
        cls, specs, tokenizer, mixture=None, document_boundary="blank_line", seed=0, **kwargs
    ):
        """`StreamingData` from `--data` specs and an optional `--mixture` string or dict.

        Sources with weight 0 are left out. `seed` seeds the quality filters' draws;
        `kwargs` go to the constructor.
        """
        if isinstance(mixture, str):
            mixture = parse_mixture(mixture)
        sources = sources_from_specs(specs, document_boundary, seed)
        weights = mixture_weights([source.name for source in sources], mixture)
        kept = [(s, w) for s, w in zip(sources, weights) if w > 0]
        return cls([s for s, _ in kept], tokenizer, weights=[w for _, w in kept], **kwargs)

    def split_documents(self, source, held_out=False, shuffle_seed=None):
        """This host's training (or held-out) documents of `source`, in its order (files
        shuffled per epoch with `shuffle_seed`, see `DocumentSource.documents`)."""
        documents = source.documents(self.num_hosts, self.host_index, shuffle_seed)
        return self._split(documents, held_out)

    def _split(self, documents, held_out):
        def select(texts):
            in_split = sources_lib.held_out_mask(texts, self.held_out_fraction)
            return tf.boolean_mask(texts, in_split if held_out else tf.logical_not(in_split))

        # Batched: one `tf.data` step per batch, not per document.
        return documents.batch(sources_lib.PYTHON_BATCH).map(select).unbatch()

    def check(self, max_documents=1000):
        """Checks every source before training: its start (`DocumentSource.check`), and that
        its first `max_documents` documents leave a training document with text after the
        held-out split and any quality filter (a bounded read).

        Raises:
            DataError: naming the source and what is wrong.
        """
        for source in self.sources:
            source.check()
            first = source.first_documents(max_documents, self.num_hosts, self.host_index)
            documents = self._split(first, held_out=False)
            with self.reading():
                has_text = documents.filter(lambda text: tf.strings.length(text) > 0)
                found = any(True for _ in has_text.take(1))
            if not found:
                raise DataError(
                    f"{source.name}: no training document with text among its first "
                    f"{max_documents} documents (after the held-out split and any quality "
                    "filter). Check the source, its field, or the filter; or drop it."
                )

    def training_dataset(self, seed):
        """The endless, deterministic (given `seed`) stream of training batches.

        Returns:
            A `tf.data.Dataset` of `(x, y, sample_weight)` (see
            `keras_glam.data.packing.causal_lm_example`), `[batch_size, sequence_length]`.
        """
        # Files are read in a new order each epoch, unless shuffling is off.
        shuffle_seed = seed if self.shuffle_buffer else None
        documents = [
            self.split_documents(source, held_out=False, shuffle_seed=shuffle_seed)
            for source in self.sources
        ]
        dataset = packed_lm_dataset(
            documents,
            self.tokenizer,
            sequence_length=self.sequence_length,
            batch_size=self.batch_size,
            weights=self.weights,
            shuffle_buffer=self.shuffle_buffer,
            seed=seed,
            repeat=True,
        )
        return sources_lib.checkpointable(dataset)

    def held_out_texts(self):
        """The held-out documents: the first `held_out_documents` (shared out by weight, at
        least one per source) of each source's held-out share, source after source."""
        parts = []
        for source, weight in zip(self.sources, self.weights):
            count = max(1, round(self.held_out_documents * weight))
            parts.append(self.split_documents(source, held_out=True).take(count))
        documents = parts[0]
        for part in parts[1:]:
            documents = documents.concatenate(part)
        return documents

    def held_out_dataset(self):
        """The held-out batches of `held_out_texts`: finite, in a fixed order, every batch
        padded to `batch_size` rows (empty rows weigh 0), cached after the first pass, with a
        known length.

        Raises:
            DataError: no source has a held-out document, or one the reading stops at.
        """
        documents = self.held_out_texts()
        with self.reading():
            try:
                batches = packed_lm_dataset(
                    documents,
                    self.tokenizer,
                    sequence_length=self.sequence_length,
                    batch_size=self.batch_size,
                    shuffle_buffer=0,
                    drop_remainder=False,
                )
            except ValueError:
                raise DataError(
                    f"No held-out document: none of the sources' documents falls in the "
                    f"held-out share ({self.held_out_fraction}). Add documents or raise the "
                    "held-out fraction."
                ) from None
            held_out = pad_batches(batches, self.batch_size).cache()
            count = sum(1 for _ in held_out)
        return held_out.apply(tf.data.experimental.assert_cardinality(count))

    def unigram_entropy(self, held_out, seed=0, baseline_tokens=2**20):
        """Held-out cross-entropy (nats/token) of an add-one-smoothed unigram model whose counts
        come from the first `baseline_tokens` training targets (stream `seed`), over exactly
        the targets and weights of the held-out loss."""
        counts = np.zeros(self.tokenizer.vocabulary_size(), dtype="float64")
        tokens_per_batch = self.batch_size * self.sequence_length
        batches = self.training_dataset(seed).take(max(1, -(-baseline_tokens // tokens_per_batch)))
        with self.reading():
            for _, labels, sample_weight in batches.as_numpy_iterator():
                counts += np.bincount(labels[sample_weight > 0], minlength=len(counts))
        return unigram_cross_entropy(counts, held_out)

    def fingerprint(self, seed):
        """A description of the stream `seed` produces (each source's identity, see
        `DocumentSource.identity`; the tokenizer's vocabulary; weights, shapes, sharding),
        stored with the iterator's checkpoint to refuse resuming on another input."""
        return json.dumps(
            {
                "sources": [repr(source) for source in self.sources],
                "tokenizer": tokenizer_identity(self.tokenizer),
                "weights": self.weights,
                "sequence_length": self.sequence_length,
                "batch_size": self.batch_size,
                "held_out_fraction": self.held_out_fraction,
                "shuffle_buffer": self.shuffle_buffer,
                "hosts": [self.num_hosts, self.host_index],
                "seed": seed,
            },
            sort_keys=True,
        )

    def training_iterator(self, seed, window=64):
        """A `DataIterator` over `training_dataset(seed)` (restore it with `.restore`). With
        several hosts its files carry the host's index, so that every host's state can sit in
        one checkpoint directory."""
        return DataIterator(
            self.training_dataset(seed),
            window=window,
            describe_error=self.describe_error,
            fingerprint=self.fingerprint(seed),
            file_prefix=data_file_prefix(self.num_hosts, self.host_index),
        )

    def training_tokens(self, at_most):
        """Tokens (as packed, `<s>` and `</s>` included) of this host's training documents,
        counted source after source until `at_most`: a bounded read, which tells a corpus
        smaller than one batch from a larger one without reading the larger one through."""
        total = 0
        for source in self.sources:
            rows = pack_documents(
                self.split_documents(source, held_out=False),
                self.tokenizer,
                sequence_length=self.sequence_length,
            )
            needed_rows = -(-(at_most - total) // self.sequence_length)
            with self.reading():
                for row in rows.take(needed_rows).as_numpy_iterator():
                    total += int(np.count_nonzero(row["segment_ids"]))
            if total >= at_most:
                break
        return total

    def describe_error(self, error):
        """The one-line message for a `tf.errors.OpError` of these sources, or None."""
        return sources_lib.describe_data_error(error, self.sources)

    @contextlib.contextmanager
    def reading(self):
        """Reads of these sources inside become one-line `DataError`s when `tf.data` stops
        them (a bad line in a shard: the file and line)."""
        try:
            yield
        except tf.errors.OpError as error:
            raise DataError(self.describe_error(error) or str(error)) from None


def tokenizer_identity(tokenizer):
    """The tokenizer's class and a digest of its vocabulary (a SentencePiece model's bytes, or
    the list of tokens), for `StreamingData.fingerprint`."""
    proto = getattr(tokenizer, "proto", None)
    vocabulary = proto if isinstance(proto, bytes) else json.dumps(tokenizer.get_vocabulary())
    digest = hashlib.sha256(vocabulary if isinstance(vocabulary, bytes) else vocabulary.encode())
    return f"{type(tokenizer).__name__}(vocabulary_sha256={digest.hexdigest()[:16]})"


DATA_FILE_PREFIX = "data"


def data_file_prefix(num_hosts=1, host_index=0):
    """How a host's `DataIterator` files begin: `data` for a single host, `data-host00003`
    for host 3 of several (so hosts' files never collide in one directory)."""
    return DATA_FILE_PREFIX if num_hosts == 1 else f"{DATA_FILE_PREFIX}-host{host_index:05d}"


class DataIterator:
    """An iterator over an endless `tf.data` dataset of batches that can be saved and restored.

    Keras' `fit` (and KerasHub's prefetching) pulls a few batches ahead of the step it
    trains; the iterator keeps the last `window` batches, so that saving at the trained
    position stores the `tf.data` iterator's state (at the batch last pulled) plus the batches
    pulled beyond the trained position, and a restored iterator hands those out first.

    Batches have indices (0, 1, ... from the stream's start). Every generator (`batches(p)`)
    and every `tf.data` iterator of `dataset(p)` has its own cursor, from `p`: Keras makes two
    iterators per `fit` and drops one, and a late pull from it hands out a batch already
    kept (or pulls the next one) without moving another's. `position` is one past the
    furthest batch handed out.

    Batches are NumPy structures. A data error raised by the pipeline becomes a `DataError`
    with one line naming the file (see `keras_glam.data.sources`), kept as `error`: inside
    `dataset()` `tf.data` turns it into a `tf.errors` error, and the trainer raises `error`
    instead.

    Args:
        dataset: an endless `tf.data.Dataset` (a finite one ends the generators at its end).
        window: batches kept for saving and handing out again.
        describe_error: callable turning a `tf.errors.OpError` into a message, or None.
        fingerprint: a string saved with the state and compared on restore.
        file_prefix: how the names of the saved files begin (`data_file_prefix`).

    Saving may run on another thread than the one pulling batches (Keras' `fit` pulls from a
    `tf.data` thread while a callback saves): a lock keeps the saved iterator state and the
    saved pending batches consistent.

    Example:
    ```python
    iterator = data.training_iterator(seed=0)
    lm.fit(iterator.dataset(position=0), steps_per_epoch=100, epochs=1)
    iterator.save("run/checkpoints/ckpt-3", position=100)   # after step 100
    # later, in a new process:
    iterator = data.training_iterator(seed=0)
    position = iterator.restore("run/checkpoints/ckpt-3")   # 100; nothing is read again
    lm.fit(iterator.dataset(position), steps_per_epoch=100, epochs=1)
    ```
    """

    def __init__(
        self, dataset, window=64, describe_error=None, fingerprint="", file_prefix=DATA_FILE_PREFIX
    ):
        self._structure = dataset.element_spec
        self._iterator = iter(dataset)
        self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
        self._window = collections.deque(maxlen=window)  # (index, batch) of the last pulls
        self._pulled = 0  # Batches pulled from the dataset (the next one's index).
        self.position = 0  # One past the furthest batch handed out.
        self.error = None  # The `DataError` that stopped the stream, if one did.
        self._describe_error = describe_error
        self._lock = threading.Lock()
        self.fingerprint = fingerprint
        self.iterator_prefix = f"{file_prefix}_iterator"
        self.pending_file = f"{file_prefix}_pending.npz"
        self.state_file = f"{file_prefix}_iterator.json"

    def __iter__(self):
        return self

    def __next__(self):
        """The batch after the furthest handed out."""
        return self._batch_at(self.position)

    def _batch_at(self, index):
        with self._lock:
            self._check_kept(index, "hand out")
            while self._pulled <= index:
                self._pull()
            self.position = max(self.position, index + 1)
            return self._window[index - self._first_kept()][1]

    def _pull(self):
        """Pulls the next batch into the window (with the lock held)."""
        try:
            batch = next(self._iterator)
        except tf.errors.OpError as error:
            message = self._describe_error(error) if self._describe_error else None
            if message:
                self.error = DataError(message)
                raise self.error from None
            raise
        batch = tf.nest.map_structure(lambda tensor: tensor.numpy(), batch)
        self._window.append((self._pulled, batch))
        self._pulled += 1

    def _first_kept(self):
        return self._pulled - len(self._window)

    def _check_kept(self, position, action):
        if not self._first_kept() <= position <= self._pulled:
            raise ValueError(
                f"Cannot {action} batch {position}: batches {self._first_kept()} to "
                f"{self._pulled} are kept (raise `window`)."
            )

    def batches(self, position):
        """A generator of batches from `position` (one of the last `window` pulled, or the
        next one), with its own cursor.

        Raises:
            ValueError: `position` is no longer kept (raise `window`).
        """
        with self._lock:
            self._check_kept(position, "hand out")
        return self._batches_from(position)

    def _batches_from(self, position):
        while True:
            try:
                batch = self._batch_at(position)
            except StopIteration:  # A finite dataset's end.
                return
            yield batch
            position += 1

    def dataset(self, position):
        """A `tf.data.Dataset` over `batches(position)`, for `fit` (KerasHub tasks take
        datasets, not generators). Each iterator made from it starts at `position`; Keras' own
        prefetching pulls a few batches ahead, which the window keeps."""
        return tf.data.Dataset.from_generator(
            lambda: self.batches(position), output_signature=self._structure
        )

    def save(self, directory, position):
        """Writes the state at `position` (the batches trained on) into `directory` (which
        must exist), as `<prefix>_iterator.index`, `<prefix>_iterator.data-*`,
        `<prefix>_pending.npz` and `<prefix>_iterator.json` (`file_prefix`, `data` by
        default).

        Before any batch was pulled, saving pulls the first one (kept as pending): the
        `tf.data` iterator's saved state then holds its shuffle seeds, which a restored
        iterator would otherwise draw from TensorFlow's global seed.

        Returns:
            The names of the files written (to fsync or checksum with the checkpoint).
        """
        with self._lock:
            if self._pulled == 0:
                self._pull()
            self._check_kept(position, "save at")
            self._checkpoint.write(os.path.join(directory, self.iterator_prefix))
            pending = [batch for index, batch in self._window if index >= position]
        arrays = {
            f"batch{i}_{j}": value
            for i, batch in enumerate(pending)
            for j, value in enumerate(tf.nest.flatten(batch))
        }
        np.savez(os.path.join(directory, self.pending_file), **arrays)
        with open(os.path.join(directory, self.state_file), "w", encoding="utf-8") as file:
            json.dump(
                {"position": position, "pending": len(pending), "fingerprint": self.fingerprint},
                file,
            )
        return sorted(
            name
            for name in os.listdir(directory)
            if name.startswith(f"{self.iterator_prefix}.") or name == self.pending_file
        )

    def has_state(self, directory):
        """Whether `directory` holds a state this iterator's `save` wrote (of any input)."""
        return os.path.isfile(os.path.join(directory, self.state_file))

    def restore(self, directory):
        """Continues from the state saved in `directory`; returns the position saved there.

        Raises:
            ValueError: the directory holds no iterator state, or one saved for another input
                (naming what differs).
        """
        if not self.has_state(directory):
            raise ValueError(f"{directory} holds no data iterator state ({self.state_file}).")
        with open(os.path.join(directory, self.state_file), encoding="utf-8") as file:
            state = json.load(file)
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"The data iterator state in {directory} was saved for another input "
                f"({_fingerprint_difference(state['fingerprint'], self.fingerprint)} differ: "
                "--data files or options, --document-boundary, vocabulary, --mixture, shapes, "
                "hosts or seed). Resume with the same settings, or start a new run in another "
                "--output."
            )
        self._checkpoint.read(os.path.join(directory, self.iterator_prefix)).assert_consumed()
        template = tf.nest.flatten(self._structure)
        with np.load(os.path.join(directory, self.pending_file)) as arrays:
            pending = [
                tf.nest.pack_sequence_as(
                    self._structure, [arrays[f"batch{i}_{j}"] for j in range(len(template))]
                )
                for i in range(state["pending"])
            ]
        position = state["position"]
        with self._lock:
            self._window = collections.deque(
                ((position + i, batch) for i, batch in enumerate(pending)),
                maxlen=self._window.maxlen,
            )
            self._pulled = position + len(pending)
            self.position = position
        return position


def _fingerprint_difference(saved, current):
    """The keys in which two `StreamingData.fingerprint`s differ, as a phrase."""
    try:
        saved, current = json.loads(saved), json.loads(current)
    except ValueError:
        return "the descriptions"
    keys = sorted(key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key))
    return ", ".join(keys) or "the descriptions"
