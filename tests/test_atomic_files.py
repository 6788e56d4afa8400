"""`keras_glam.utils.atomic_files`: a write lands whole or not at all."""

import hashlib
import os

import pytest

from keras_glam.utils.atomic_files import file_sha256
from keras_glam.utils.atomic_files import replacing
from keras_glam.utils.atomic_files import write_json_atomically


def _write_directory(path, text):
    os.makedirs(path)
    with open(os.path.join(path, "content.txt"), "w", encoding="utf-8") as file:
        file.write(text)


def _read(path):
    with open(os.path.join(path, "content.txt"), encoding="utf-8") as file:
        return file.read()


def test_a_directory_is_swapped_whole(tmp_path):
    target = str(tmp_path / "preset")
    with replacing(target) as temporary:
        _write_directory(temporary, "first")
    with replacing(target) as temporary:
        _write_directory(temporary, "second")
    assert _read(target) == "second"
    assert os.listdir(tmp_path) == ["preset"]  # no temporary or old copy left behind


def test_a_failed_write_leaves_the_old_content(tmp_path):
    target = str(tmp_path / "preset")
    with replacing(target) as temporary:
        _write_directory(temporary, "kept")
    with pytest.raises(RuntimeError, match="disk full"):
        with replacing(target) as temporary:
            _write_directory(temporary, "half")
            raise RuntimeError("disk full")
    assert _read(target) == "kept"
    assert os.listdir(tmp_path) == ["preset"]


def test_the_temporary_name_keeps_the_extension(tmp_path):
    with replacing(str(tmp_path / "classifier.keras")) as temporary:
        assert temporary.endswith("classifier.keras")
        assert os.path.dirname(temporary) == str(tmp_path)
        open(temporary, "wb").close()
    assert os.listdir(tmp_path) == ["classifier.keras"]


def test_json_and_hash(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomically(str(path), {"b": 1, "a": [1.5]}, sort_keys=True)
    assert path.read_text(encoding="utf-8") == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
