"""Packs tokenised documents into fixed-length rows, and GLaM's causal-LM input pipeline.

GLaM trained on rows of 1024 tokens holding several documents each, with attention masked
across document boundaries (Lingvo's packed LM inputs carry `segment_ids` for this). Here a
row is `token_ids [L]` and `segment_ids [L]`: every document gets a positive id within its
row (1, 1, 1, 2, 2, ...), 0 marks padding. `GLaMBackbone` takes the segment ids as its
`padding_mask`, so attention never crosses a document.

Packing is a stream: documents are tokenised and framed as GLaM's model sees a document,
`<s> text </s>` (`keras_glam.models.glam_tokenizer.frame_document`, the convention generation
and scoring share), and the concatenated token stream is cut into consecutive rows of
`sequence_length` tokens. A document longer than the space left in a row continues at the
start of the next row (with segment id 1 there, and no `<s>`). Only the very last row of a
finite stream is padded. The pipeline is deterministic: documents keep their order through
tokenisation and packing, and every shuffle and the mixture sampling draw from `seed`.
"""

import math

import numpy as np
import tensorflow as tf

from keras_glam.data.text_sources import document_dataset, is_one_shot_iterator
from keras_glam.models.glam_tokenizer import frame_document
from keras_glam.utils.checks import check_positive_integers


def _check_sequence_length(sequence_length):
    if not (isinstance(sequence_length, int) and sequence_length >= 2):
        raise ValueError(
            "`sequence_length` must be an integer >= 2 (a causal LM needs a token and its "
            f"successor in a row). Received: sequence_length={sequence_length!r}"
        )


def _resolve_token_id(tokenizer, token_id, name, how_to_fix):
    """`token_id`, else the tokenizer's `<name>_token_id`, as an int."""
    argument = f"{name}_token_id"
    if token_id is None:
        token_id = getattr(tokenizer, argument, None)
    if token_id is None:
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}) has no `{argument}`: {how_to_fix}."
        )
    if not (isinstance(token_id, (int, np.integer)) and token_id >= 0):
        raise ValueError(f"`{argument}` must be a non-negative integer. Received: {token_id!r}")
    return int(token_id)


def _resolve_document_tokens(tokenizer, start_token_id, end_token_id, add_start_token):
    """`(start_token_id, end_token_id)` framing every packed document; no start id without
    `add_start_token`."""
    end_token_id = _resolve_token_id(
        tokenizer,
        end_token_id,
        "end",
        "pass `end_token_id=` (the id that ends every document, `</s>` for GLaMTokenizer)",
    )
    if not add_start_token:
        return None, end_token_id
    start_token_id = _resolve_token_id(
        tokenizer,
        start_token_id,
        "start",
        "pass `start_token_id=` (the id that starts every document, `<s>` for GLaMTokenizer), "
        "or `add_start_token=False` to pack documents without it (not GLaM's convention)",
    )
    return start_token_id, end_token_id


def _tokenized_documents(documents, tokenizer, start_token_id, end_token_id):
    """Each document's ids framed by `frame_document`; documents without text or without
    tokens are dropped."""

    def tokenize(document):
        token_ids = tokenizer(document)
        if token_ids.shape.rank != 1:
            raise ValueError(
                "The tokenizer must map a scalar string to a 1-D tensor of token ids; for a "
                f"scalar it returned shape {token_ids.shape}."
            )
        return token_ids

    return (
        documents.filter(lambda document: tf.strings.length(document) > 0)
        .map(tokenize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .filter(lambda token_ids: tf.size(token_ids) > 0)
        .map(lambda token_ids: frame_document(token_ids, start_token_id, end_token_id))
    )


def _finish_row(row, sequence_length):
    """Numbers the documents of a row from 1 and pads it to `sequence_length` with zeros."""
    documents = row["document"]
    starts = tf.concat([[True], tf.not_equal(documents[1:], documents[:-1])], axis=0)
    segment_ids = tf.cumsum(tf.cast(starts, tf.int32))
    padding = [[0, sequence_length - tf.shape(documents)[0]]]
    return {
        "token_ids": tf.ensure_shape(tf.pad(row["token_ids"], padding), [sequence_length]),
        "segment_ids": tf.ensure_shape(tf.pad(segment_ids, padding), [sequence_length]),
    }


def _pack(token_documents, sequence_length):
    def label_tokens(index, token_ids):
        return {"token_ids": token_ids, "document": tf.fill(tf.shape(token_ids), index)}

    return (
        token_documents.enumerate()
        .map(label_tokens)
        .unbatch()
        .batch(sequence_length)
        .map(
            lambda row: _finish_row(row, sequence_length),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    )


def pack_documents(
    documents,
    tokenizer,
    sequence_length=1024,
    end_token_id=None,
    start_token_id=None,
    add_start_token=True,
):
    """Tokenises documents, frames each as `<s> text </s>`, and packs them into rows.

    Documents are read in order (no shuffling); empty documents, and documents the tokenizer
    maps to no token, are dropped. Every document is framed by `frame_document`
    (`keras_glam.models.glam_tokenizer`): GLaM's convention, which generation and scoring
    share.

    Args:
        documents: a source (see `keras_glam.data.text_sources`): a `tf.data.Dataset` of
            scalar `tf.string`, or an iterable of `str`.
        tokenizer: a callable that maps a scalar `tf.string` tensor to a 1-D tensor of integer
            ids inside a `tf.data` pipeline, e.g. `keras_glam.models.GLaMTokenizer` or any
            `keras_hub.tokenizers.Tokenizer`.
        sequence_length: int >= 2, the row length `L`. Defaults to 1024 (GLaM).
        end_token_id: the id appended to every document. Defaults to
            `tokenizer.end_token_id`.
        start_token_id: the id prepended to every document. Defaults to
            `tokenizer.start_token_id`.
        add_start_token: bool. Prepend the start token (GLaM's convention). `False` packs
            `text </s>`: then a document's first token is never a label, and generation
            (which starts prompts with `<s>`) sees inputs training never showed. Defaults to
            `True`.

    Returns:
        A `tf.data.Dataset` of `{"token_ids": int32 [L], "segment_ids": int32 [L]}`.

    Example:

    >>> import keras_hub
    >>> rows = pack_documents(["abc", "de"], keras_hub.tokenizers.ByteTokenizer(),
    ...                       sequence_length=4, end_token_id=3, start_token_id=2)
    >>> [row["token_ids"].tolist() for row in rows.as_numpy_iterator()]
    [[2, 97, 98, 99], [3, 2, 100, 101], [3, 0, 0, 0]]
    >>> [row["segment_ids"].tolist() for row in rows.as_numpy_iterator()]
    [[1, 1, 1, 1], [1, 2, 2, 2], [1, 0, 0, 0]]
    """
    _check_sequence_length(sequence_length)
    start_token_id, end_token_id = _resolve_document_tokens(
        tokenizer, start_token_id, end_token_id, add_start_token
    )
    token_documents = _tokenized_documents(
        document_dataset(documents), tokenizer, start_token_id, end_token_id
    )
    return _pack(token_documents, sequence_length)


def causal_lm_example(rows):
    """Turns packed rows into Keras `(x, y, sample_weight)` for next-token prediction.

    `y[i] = token_ids[i + 1]`. A label counts (`sample_weight` 1) only when position `i` and
    `i + 1` hold the same document, so no label crosses a document boundary. With documents
    framed as `<s> t1 .. tn </s>` (`pack_documents`): `<s>`'s position is trained to predict
    the first real token `t1`, the last real token to predict `</s>`, while the end token's
    position (whose successor starts another document), padding, and the last position of a
    row (whose successor is in the next row) weigh 0; so `<s>` is never a label. Cost: one
    label in `L` at row ends (0.1% at L = 1024).

    Args:
        rows: `{"token_ids": [..., L], "segment_ids": [..., L]}`, batched or not.

    Returns:
        `({"token_ids": [..., L], "padding_mask": [..., L]}, y [..., L], sample_weight
        [..., L])`; `padding_mask` holds the segment ids, `sample_weight` is float32.

    Example:

    >>> rows = {"token_ids": tf.constant([2, 5, 6, 1, 2, 7, 1, 0]),  # <s> = 2, </s> = 1
    ...         "segment_ids": tf.constant([1, 1, 1, 1, 2, 2, 2, 0])}
    >>> x, y, weight = causal_lm_example(rows)
    >>> y.numpy().tolist()
    [5, 6, 1, 2, 7, 1, 0, 0]
    >>> weight.numpy().tolist()
    [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    """
    token_ids, segment_ids = rows["token_ids"], rows["segment_ids"]
    last_position = tf.zeros_like(token_ids[..., :1])
    labels = tf.concat([token_ids[..., 1:], last_position], axis=-1)
    next_segment_ids = tf.concat([segment_ids[..., 1:], tf.zeros_like(last_position)], axis=-1)
    sample_weight = tf.cast(
        tf.not_equal(segment_ids, 0) & tf.equal(next_segment_ids, segment_ids), tf.float32
    )
    return {"token_ids": token_ids, "padding_mask": segment_ids}, labels, sample_weight


def _as_source_list(sources):
    """`(list_of_sources, is_mixture)`: a list of datasets or of non-string iterables is a
    mixture; one dataset or one iterable of strings is a single source."""
    if isinstance(sources, (list, tuple)) and sources:
        if all(
            isinstance(s, tf.data.Dataset) or not isinstance(s, (str, bytes)) for s in sources
        ):
            return list(sources), True
    return [sources], False


def _normalised_weights(weights, num_sources):
    if weights is None:
        return [1.0 / num_sources] * num_sources
    weights = [float(w) for w in weights]
    if len(weights) != num_sources:
        raise ValueError(
            f"Got {len(weights)} mixture weights for {num_sources} sources: give one weight "
            "per source, in the same order."
        )
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            "Mixture weights must be finite and non-negative with a positive sum (they are "
            f"normalised to sum to 1). Received: weights={weights}"
        )
    return [w / sum(weights) for w in weights]


def _stage_seed(seed, source_index, stage):
    """An independent seed for each shuffle, derived from the user's seed."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, source_index, stage]).generate_state(1)[0])


def _require_documents(token_documents, description):
    if not any(True for _ in token_documents.take(1)):
        raise ValueError(
            f"{description} has no document with text (it is empty, or every document is "
            "empty or tokenises to nothing). Check the source, or drop it from the mixture."
        )


def packed_lm_dataset(
    sources,
    tokenizer,
    sequence_length=1024,
    batch_size=8,
    weights=None,
    end_token_id=None,
    start_token_id=None,
    add_start_token=True,
    shuffle_buffer=10_000,
    seed=None,
    repeat=False,
    drop_remainder=True,
    num_shards=1,
    shard_index=0,
    skip_batches=0,
):
    """GLaM's training input: packed, shuffled, mixed, batched causal-LM examples.

    For each source: documents are sharded (`shard(num_shards, shard_index)`, by document),
    shuffled, optionally repeated, tokenised, framed as `<s> text </s>` and packed into rows
    (`pack_documents`); the rows are shuffled again. Several sources are mixed row by row with
    `tf.data.Dataset.sample_from_datasets`, so `weights` are fractions of rows, i.e. of
    training tokens (GLaM mixed six sources with weights 0.42 / 0.06 / 0.28 / 0.02 / 0.20 /
    0.02). Rows are batched and turned into `(x, y, sample_weight)` by `causal_lm_example`.

    Everything streams: memory holds the shuffle buffers, not the corpus. Given a `seed`, the
    output is deterministic, so resuming at batch `N` is `skip_batches=N` with the same
    arguments. Each source is checked for at least one document with text (after sharding)
    before the dataset is returned; this reads the start of each source once.

    Args:
        sources: one source, or a list of sources to mix. A source is a `tf.data.Dataset` of
            scalar `tf.string` documents (`keras_glam.data.text_files(...)` reads files), or an
            iterable of `str`. A list whose items are all datasets or non-string iterables is
            a mixture; a list of strings is one source of documents.
        tokenizer: maps a scalar `tf.string` tensor to a 1-D tensor of ids inside `tf.data`
            (e.g. `GLaMTokenizer`, any `keras_hub.tokenizers.Tokenizer`).
        sequence_length: int >= 2, tokens per row. Defaults to 1024 (GLaM).
        batch_size: rows per batch. Defaults to 8.
        weights: one non-negative weight per source (normalised), or `None` for equal weights.
        end_token_id: the id ending every document. Defaults to `tokenizer.end_token_id`.
        start_token_id: the id starting every document. Defaults to
            `tokenizer.start_token_id`.
        add_start_token: bool, start every document with the start token (GLaM's convention,
            see `pack_documents`). Defaults to `True`.
        shuffle_buffer: buffer size of the document shuffle and of the row shuffle (per
            source); 0 or `None` disables shuffling. Defaults to 10000.
        seed: int seed of the shuffles and of the mixture sampling; `None` is
            non-deterministic.
        repeat: repeat every source forever (reshuffled each epoch). Without it the dataset
            ends when the first source of a mixture runs out, so that the weights hold
            throughout. A one-shot iterator (generator) cannot be repeated.
        drop_remainder: drop a last incomplete batch. Defaults to `True` (static shapes).
        num_shards: number of input shards, e.g. `jax.process_count()`. Defaults to 1.
        shard_index: this process's shard, e.g. `jax.process_index()`. Defaults to 0.
        skip_batches: number of batches to skip at the start (resuming). Defaults to 0.

    Returns:
        A `tf.data.Dataset` of `({"token_ids": int32 [B, L], "padding_mask": int32 [B, L]},
        y int32 [B, L], sample_weight float32 [B, L])`, prefetched.

    Example:

    >>> import keras_hub
    >>> dataset = packed_lm_dataset(
    ...     [["aaaa", "aa"], ["bbb"]], keras_hub.tokenizers.ByteTokenizer(),
    ...     sequence_length=8, batch_size=2, weights=[0.7, 0.3], end_token_id=0,
    ...     start_token_id=1, seed=1, repeat=True)
    >>> x, y, sample_weight = next(iter(dataset))
    >>> tuple(x["token_ids"].shape), tuple(x["padding_mask"].shape)
    ((2, 8), (2, 8))
    """
    _check_sequence_length(sequence_length)
    check_positive_integers(batch_size=batch_size)
    if not (isinstance(num_shards, int) and num_shards >= 1 and 0 <= shard_index < num_shards):
        raise ValueError(
            "Need an integer `num_shards` >= 1 and 0 <= `shard_index` < `num_shards`. "
            f"Received: num_shards={num_shards!r}, shard_index={shard_index!r}"
        )
    if not (isinstance(skip_batches, int) and skip_batches >= 0):
        raise ValueError(f"`skip_batches` must be an integer >= 0. Received: {skip_batches!r}")
    start_token_id, end_token_id = _resolve_document_tokens(
        tokenizer, start_token_id, end_token_id, add_start_token
    )
    source_list, is_mixture = _as_source_list(sources)
    mixture_weights = _normalised_weights(weights, len(source_list))
    shuffle = bool(shuffle_buffer)
    if skip_batches and seed is None and (shuffle or len(source_list) > 1):
        raise ValueError(
            "`skip_batches` resumes a stream only if the stream is deterministic: pass a "
            "`seed` (or disable shuffling with `shuffle_buffer=0` for a single source)."
        )

    per_source_rows = []
    for index, source in enumerate(source_list):
        description = f"Source {index} of the mixture" if is_mixture else "The corpus"
        if num_shards > 1:
            description += f" (shard {shard_index} of {num_shards})"
        documents = document_dataset(source)
        one_shot = is_one_shot_iterator(source)
        if one_shot and repeat:
            raise ValueError(
                f"{description} is a one-shot iterator (a generator), which cannot be "
                "repeated: pass a list, a re-iterable object, or a tf.data.Dataset."
            )
        if num_shards > 1:
            documents = documents.shard(num_shards, shard_index)
        if not one_shot:  # Checking would consume a generator's documents.
            _require_documents(
                _tokenized_documents(documents, tokenizer, start_token_id, end_token_id),
                description,
            )
        if shuffle:
            documents = documents.shuffle(shuffle_buffer, seed=_stage_seed(seed, index, 0))
        if repeat:
            documents = documents.repeat()
        rows = _pack(
            _tokenized_documents(documents, tokenizer, start_token_id, end_token_id),
            sequence_length,
        )
        if shuffle:
            rows = rows.shuffle(shuffle_buffer, seed=_stage_seed(seed, index, 1))
        per_source_rows.append(rows)

    if len(per_source_rows) == 1:
        rows = per_source_rows[0]
    else:
        rows = tf.data.Dataset.sample_from_datasets(
            per_source_rows, weights=mixture_weights, seed=seed, stop_on_empty_dataset=True
        )
    batches = rows.batch(batch_size, drop_remainder=drop_remainder).skip(skip_batches)
    return batches.map(causal_lm_example, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
        tf.data.AUTOTUNE
    )
