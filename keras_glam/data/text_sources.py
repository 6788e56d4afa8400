"""Corpora as `tf.data` datasets of documents (scalar `tf.string`), read lazily.

A *source* is one of:
- a `tf.data.Dataset` whose elements are scalar `tf.string` documents (for example
  `text_files(...)`, or a TFDS / TFRecord pipeline mapped to its text field);
- any other iterable of Python `str` documents (a list, or a generator for streaming).

A single `str` is not a source: it is ambiguous between one document and one file name.
"""

import itertools
import os

import tensorflow as tf

DOCUMENT_BOUNDARIES = ("blank_line", "line", "file")


def _is_blank(line):
    return tf.equal(tf.strings.strip(line), "")


def paragraphs(lines):
    """Groups a file's lines (a dataset of scalar `tf.string`) into documents separated by blank
    (or whitespace-only) lines.

    Streaming: a `scan` carries the paragraph read so far and emits it at the next blank line.
    The caller appends one blank line to every file so that its last paragraph is emitted too.
    """

    def read_line(paragraph, line):
        started = tf.strings.length(paragraph) > 0
        blank = _is_blank(line)
        extended = tf.where(started, tf.strings.join([paragraph, line], "\n"), line)
        next_paragraph = tf.where(blank, tf.constant(""), extended)
        return next_paragraph, (blank & started, paragraph)

    return (
        lines.scan(tf.constant(""), read_line)
        .filter(lambda complete, paragraph: complete)
        .map(lambda complete, paragraph: paragraph)
    )


def _file_paragraphs(path):
    return paragraphs(tf.data.TextLineDataset(path).concatenate(tf.data.Dataset.from_tensors("")))


def text_files(paths, document_boundary="blank_line"):
    """Reads text files into a dataset of documents, streaming (one line at a time).

    Files are read one after another, in the sorted order of each pattern's matches, patterns
    in the order given.

    Args:
        paths: a path or glob pattern (`str` or `os.PathLike`), or a list of them. Every
            pattern must match at least one file.
        document_boundary: where one document ends and the next begins:
            - `"blank_line"` (default): paragraphs separated by one or more blank or
              whitespace-only lines; a paragraph's lines are joined with `"\\n"` (without a
              trailing one). A file's end also ends a paragraph.
            - `"line"`: every non-blank line is a document (JSON-lines-like corpora).
            - `"file"`: each file is one document, read whole (a file must fit in memory).

    Returns:
        A `tf.data.Dataset` of scalar `tf.string` documents.

    Example:

    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "corpus.txt"
    >>> _ = path.write_text("First document,\\nstill first.\\n\\n\\nSecond document.\\n")
    >>> [d.decode() for d in text_files(str(path)).as_numpy_iterator()]
    ['First document,\\nstill first.', 'Second document.']
    """
    if document_boundary not in DOCUMENT_BOUNDARIES:
        raise ValueError(
            f"`document_boundary` must be one of {DOCUMENT_BOUNDARIES}. "
            f"Received: document_boundary={document_boundary!r}"
        )
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for pattern in paths:
        matches = sorted(tf.io.gfile.glob(os.fspath(pattern)))
        if not matches:
            raise FileNotFoundError(
                f"No file matches {os.fspath(pattern)!r}. Check the path or glob pattern."
            )
        files.extend(matches)
    if not files:
        raise ValueError("`paths` is empty: pass at least one text file or glob pattern.")
    file_names = tf.data.Dataset.from_tensor_slices(files)
    if document_boundary == "file":
        return file_names.map(tf.io.read_file)
    if document_boundary == "line":
        return file_names.flat_map(tf.data.TextLineDataset).filter(
            lambda line: tf.logical_not(_is_blank(line))
        )
    return file_names.flat_map(_file_paragraphs)


def is_one_shot_iterator(source):
    """True when iterating `source` consumes it (a generator), so it can be read only once."""
    return not isinstance(source, tf.data.Dataset) and iter(source) is source


def _check_string(document):
    if not isinstance(document, (str, bytes)):
        raise TypeError(
            "Documents must be `str` (or `bytes`); got "
            f"{type(document).__name__}: {document!r:.80}. An iterable source must yield "
            "one document per item; for a mixture of several sources pass a list of "
            "sources (lists, generators or datasets) with `weights`."
        )
    return document


def _checked_strings(documents):
    return map(_check_string, documents)


def document_dataset(source):
    """A source (see this module's docstring) as a `tf.data.Dataset` of scalar `tf.string`.

    Python iterables are streamed through `tf.data.Dataset.from_generator`, never copied whole.
    A re-iterable (a list, or an object whose `__iter__` returns a fresh iterator) can be read
    several times (for `repeat`); a one-shot iterator (a generator) only once. A one-shot
    iterator is checked for emptiness here, by reading its first document.

    Args:
        source: a `tf.data.Dataset` of scalar `tf.string`, or an iterable of `str`.

    Returns:
        A `tf.data.Dataset` of scalar `tf.string` documents.

    Raises:
        TypeError: for a single `str`, a non-iterable, a dataset of other elements, or a
            first document that is not a `str` (later ones fail when read, inside tf.data).
        ValueError: for a one-shot iterator that yields nothing.

    Example:

    >>> [d.decode() for d in document_dataset(["one", "two"]).as_numpy_iterator()]
    ['one', 'two']
    """
    string_spec = tf.TensorSpec(shape=(), dtype=tf.string)
    if isinstance(source, tf.data.Dataset):
        if source.element_spec != string_spec:
            raise TypeError(
                "A dataset source must yield scalar tf.string documents; its element_spec is "
                f"{source.element_spec}. Map it to the text field (`ds.map(lambda x: "
                "x['text'])`), or `unbatch()` a batched dataset."
            )
        return source
    if isinstance(source, (str, bytes)):
        raise TypeError(
            "A single string is not a corpus: wrap documents in a list (`[text]`), or read "
            "files with `keras_glam.data.text_files(path)`."
        )
    try:
        iter(source)
    except TypeError:
        raise TypeError(
            "A source must be a tf.data.Dataset of strings or an iterable of `str`; got "
            f"{type(source).__name__}."
        ) from None
    if is_one_shot_iterator(source):
        first = next(source, None)
        if first is None:
            raise ValueError(
                "The corpus is empty: the iterator yielded no document. Check the data, or "
                "the iterator was already consumed (a generator can be read only once)."
            )
        stream = itertools.chain([_check_string(first)], source)

        def make_iterator():
            return _checked_strings(stream)

    else:
        # A wrong item type surfaces inside tf.data as an InvalidArgumentError; checking the
        # first item here turns the common mistake into a TypeError at construction.
        for first in source:
            _check_string(first)
            break

        def make_iterator():
            return _checked_strings(iter(source))

    return tf.data.Dataset.from_generator(make_iterator, output_signature=string_spec)
