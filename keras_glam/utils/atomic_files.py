"""Atomic writes and file hashing: the one home of both in keras_glam.

A file or directory written through `replacing(path)` appears at `path` complete or not at all:
it is written under a hidden temporary name beside `path` (the same file system, so the final
rename is atomic), flushed to disk, then renamed onto `path`. A crash leaves the old content (or
nothing) at `path`, and at worst a `.tmp-*` entry beside it.
"""

import contextlib
import hashlib
import json
import os
import shutil
import uuid

TEMPORARY_PREFIX = ".tmp-"


def file_sha256(path):
    """Hex SHA-256 of a file, read in 1 MiB blocks.

    Example:

    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "empty"
    >>> path.write_bytes(b"")
    0
    >>> file_sha256(path)[:16]
    'e3b0c44298fc1c14'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path):
    """Flush a file's or a directory's contents (a directory: its entries) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def durable_replace(source, destination):
    """`os.replace(source, destination)` that survives a power cut once it returns.

    `source` (a file, or a directory whose files are already flushed) is flushed first, and the
    parent directory of `destination` after the rename, which records the new entry.
    """
    fsync_path(source)
    os.replace(source, destination)
    fsync_path(os.path.dirname(os.path.abspath(destination)))


@contextlib.contextmanager
def replacing(path):
    """A temporary path beside `path` that replaces `path` when the block ends without error.

    The block writes a file or a directory at the yielded path. Its name ends with `path`'s
    name, so savers that read the extension (`keras.Model.save(".../x.keras")`) accept it. On
    success it takes `path`'s place (an existing directory there is swapped out and removed); on
    an error it is removed and `path` is left as it was.

    Args:
        path: the file or directory to write.

    Yields:
        str, the temporary path to write (nothing exists there yet).

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> with replacing(path) as temporary:
    ...     with open(temporary, "w") as file:
    ...         _ = file.write("complete or absent")
    >>> open(path).read()
    'complete or absent'
    """
    parent = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    temporary = os.path.join(parent, f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}-{name}")
    try:
        yield temporary
        if os.path.isdir(temporary) and os.path.isdir(path):
            # A directory cannot be renamed onto a non-empty one: move the old one aside first.
            previous = os.path.join(parent, f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}-old-{name}")
            os.replace(path, previous)
            durable_replace(temporary, path)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            durable_replace(temporary, path)
    except BaseException:
        if os.path.isdir(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
        elif os.path.lexists(temporary):
            os.remove(temporary)
        raise


def write_atomically(path, content):
    """Write `content` (str, as UTF-8, or bytes) to the file `path` atomically (`replacing`)."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    with replacing(path) as temporary:
        with open(temporary, "wb") as file:
            file.write(data)


def write_json_atomically(path, value, **dump_options):
    """Write `value` as indented JSON with a final newline to `path` atomically.

    Args:
        path: the file to write.
        value: a JSON-serialisable value.
        **dump_options: more `json.dumps` arguments (`sort_keys=True`, `default=...`).
    """
    write_atomically(path, json.dumps(value, indent=2, **dump_options) + "\n")
