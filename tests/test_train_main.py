"""The main job, `python -m keras_glam.train`: a quick run, a run from a saved preset, bad input
reported in one line, a quiet start, and resume after kill -9."""

import hashlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
import pytest

from keras_glam.training import job as main_job
from keras_glam.training.trainer import ChunkFailure
from keras_glam import cli_support
from keras_glam import train
from keras_glam.models import presets

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The environment of a user's shell: no log level chosen (conftest.py quiets TensorFlow for tests).
_USER_ENVIRONMENT = {
    **{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
    "KERAS_BACKEND": "jax",
    "PYTHONPATH": _ROOT,
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("quick") / "run"
    exit_code = train.main(["--quick", "--output", str(output), "--verbose", "0"])
    return exit_code, output


def test_quick_run_writes_every_output(quick_run):
    exit_code, output = quick_run
    assert exit_code == 0
    assert {"checkpoints", "preset", "training.png", "metrics.json"} <= set(os.listdir(output))
    with open(output / "metrics.json") as file:
        metrics = json.load(file)
    for key in (
        "held_out_cross_entropy",
        "held_out_loss",
        "unigram_entropy",
        "tokens_seen",
        "tokens_per_second",
        "steps",
        "skipped_steps",
        "tflops_per_device",
        "mfu_vs_measured_peak",
        "peak_tflops_per_device",
    ):
        assert np.isfinite(metrics[key]), key
    # On a CPU the peak is a matmul timed at start-up, and the model reaches part of it.
    assert metrics["peak_source"].startswith("measured")
    assert 0 < metrics["mfu_vs_measured_peak"] < 1.5
    assert metrics["steps"] == 6 and metrics["tokens_seen"] == 6 * 4 * 32
    assert metrics["skipped_steps"] == 0
    assert 3.0 < metrics["unigram_entropy"] < 8.32  # Below log(4096): real statistics.
    assert len(metrics["samples"]) == 2 and metrics["samples"][0].startswith("The")
    with open(output / "training.png", "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_saved_preset_loads_and_generates(quick_run):
    import keras_glam

    _, output = quick_run
    lm = keras_glam.GLaMCausalLM.from_preset(str(output / "preset"))
    text = lm.generate("def ", max_length=12)
    assert isinstance(text, str) and text.startswith("def")


def _tree_digest(directory):
    digest = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                digest[os.path.relpath(path, directory)] = hashlib.sha256(file.read()).hexdigest()
    return digest


def test_an_earlier_run_is_not_touched_without_resume(quick_run, capsys):
    _, output = quick_run
    before = _tree_digest(output)
    assert train.main(["--quick", "--output", str(output)]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert _tree_digest(output) == before


def _write(path, content):
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode) as file:
        file.write(content)
    return str(path)


def _train_vocabulary(tmp_path, size):
    from keras_glam.data.embedded_corpus import pydoc_documents
    from keras_glam.data.vocabulary import train_vocabulary

    path = str(tmp_path / "small.spm")
    train_vocabulary(pydoc_documents()[:20], size, output_path=path)
    return path


def _assert_one_line_error(error, message):
    """`error` (a command's stderr) is exactly one line: our error, matching `message`."""
    assert "Traceback" not in error, error
    lines = error.splitlines()
    assert len(lines) == 1, error
    assert lines[0].startswith("glam-train: error: "), error
    assert re.search(message, lines[0]), error


def _unwritable_directory(tmp_path):
    """A directory this process cannot create files in (root ignores permission bits)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    for candidate in (locked, pathlib.Path("/sys")):
        try:
            os.rmdir(tempfile.mkdtemp(dir=candidate))
        except OSError:
            return candidate
    pytest.skip("no unwritable directory on this machine")


def _glam_config_file(directory, registered_name="keras_glam>GLaMBackbone"):
    directory.mkdir(parents=True)
    config = presets.local_backbone_config("glam_tiny_8e")
    saved = {"registered_name": registered_name, "config": config}
    _write(directory / "config.json", json.dumps(saved))
    return str(directory)


def _bad_input_arguments(case, tmp_path):
    """The flags (after `--quick --output tmp_path/run`) that cause `case`."""
    # Held out by hash at --quick's --held-out-fraction 0.2: "One.", "Two.", "Five.", "Six.";
    # not: "Three.", "Four.", "A single paragraph of text.".
    one_row = ["--batch-size", "1", "--sequence-length", "4"]  # Needs only 4 training tokens.
    if case == "empty_file":
        return ["--data", _write(tmp_path / "empty.txt", "\n\n  \n")]
    if case == "latin1_file":
        return ["--data", _write(tmp_path / "latin1.txt", b"first line\ncaf\xe9 au lait\n")]
    if case == "one_document":
        return ["--data", _write(tmp_path / "one.txt", "A single paragraph of text.\n"), *one_row]
    if case == "nothing_held_out":
        return ["--data", _write(tmp_path / "two.txt", "Three.\n\nFour.\n"), *one_row]
    if case == "too_little_text":
        six_words = "One.\n\nTwo.\n\nThree.\n\nFour.\n\nFive.\n\nSix.\n"
        return ["--data", _write(tmp_path / "tiny.txt", six_words)]
    if case == "missing_file":
        return ["--data", str(tmp_path / "nowhere" / "*.txt")]
    if case == "glob_matches_nothing":
        _write(tmp_path / "notes.txt", "Text, but not JSON lines.\n")
        return ["--data", str(tmp_path / "*.jsonl")]
    if case == "json_line_without_field":
        return ["--data", _write(tmp_path / "a.jsonl", '{"body": "no text field"}\n')]
    if case in ("mixture_unknown_source", "mixture_negative_weight"):
        shard = _write(tmp_path / "web.jsonl", '{"text": "Some web text."}\n')
        mixture = "web=1,books=1" if case == "mixture_unknown_source" else "web=-0.5"
        return ["--data", f"web={shard}", "--mixture", mixture]
    if case == "mixture_without_data":
        return ["--mixture", "web=1"]
    if case == "negative_shuffle_buffer":
        return ["--shuffle-buffer", "-1"]
    if case == "vocabulary_mismatch":
        return ["--vocabulary", _train_vocabulary(tmp_path, 600)]
    if case == "vocabulary_not_sentencepiece":
        return ["--vocabulary", _write(tmp_path / "words.spm", "not a model\n")]
    if case == "mesh_too_big":
        return ["--mesh", "data=2,expert=2"]
    if case == "mesh_bad_axis":
        return ["--mesh", "data=2,experts=2"]
    if case == "mesh_batch_not_divisible":
        return ["--mesh", "expert=2", "--batch-size", "3"]
    if case == "mesh_experts_not_divisible":
        return ["--mesh", "expert=3", "--batch-size", "6"]
    if case == "resume_without_checkpoints":
        return ["--resume"]
    if case == "zero_steps":
        return ["--steps", "0"]
    if case == "negative_seed":
        return ["--seed", "-1"]
    if case == "unknown_preset":
        return ["--preset", "glam_smal_16e"]
    if case == "preset_is_a_file":
        return ["--preset", _write(tmp_path / "preset.txt", "glam_tiny_8e")]
    if case == "preset_directory_without_config":
        (tmp_path / "empty").mkdir()
        return ["--preset", str(tmp_path / "empty")]
    if case == "preset_is_an_earlier_run":
        _glam_config_file(tmp_path / "earlier" / "preset")
        return ["--preset", str(tmp_path / "earlier")]
    if case == "preset_config_unreadable":
        (tmp_path / "broken").mkdir()
        _write(tmp_path / "broken" / "config.json", "{not json")
        return ["--preset", str(tmp_path / "broken")]
    if case == "preset_of_another_model":
        return ["--preset", _glam_config_file(tmp_path / "gemma", "keras_hub>GemmaBackbone")]
    if case == "preset_without_tokenizer":
        return ["--preset", _glam_config_file(tmp_path / "backbone_only")]
    if case == "preset_without_vocabulary":
        return ["--preset", "glam_64b_64e"]
    if case == "preset_remote_handle":
        return ["--preset", "hf://glam-org/glam-tiny"]
    if case == "output_is_a_file":
        return ["--output", _write(tmp_path / "run.txt", "")]
    if case == "output_under_a_file":
        return ["--output", str(pathlib.Path(_write(tmp_path / "file", "")) / "run")]
    if case == "output_unwritable":
        return ["--output", str(_unwritable_directory(tmp_path) / "run")]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty_file", "data: no training document with text among its first 1000"),
        ("latin1_file", "latin1.txt: the file is not UTF-8 text: byte 14 is b'\\\\xe9'"),
        ("one_document", "No held-out document: .* raise the held-out fraction"),
        ("nothing_held_out", "No held-out document"),
        ("too_little_text", "The training split has \\d+ tokens, fewer than one batch"),
        ("missing_file", "no file matches .*nowhere/\\*.txt"),
        ("glob_matches_nothing", "data: no file matches .*\\*.jsonl'"),
        ("json_line_without_field", "a.jsonl: line 1 has no text field 'text' \\(found: body\\)"),
        ("mixture_unknown_source", "--mixture names 'books', which no --data spec defines"),
        ("mixture_negative_weight", "the weight of 'web' is -0.5; weights must be finite"),
        ("mixture_without_data", "--mixture weighs the sources of --data, and none is given"),
        ("negative_shuffle_buffer", "--shuffle-buffer must be an integer >= 0, got -1"),
        ("vocabulary_mismatch", "The tokenizer has 600 tokens but preset 'glam_tiny_8e'"),
        ("vocabulary_not_sentencepiece", "words.spm is not a SentencePiece model"),
        ("mesh_too_big", "needs 4 devices, there are 1"),
        ("mesh_bad_axis", "axis=size pairs over the axes data, expert, model"),
        ("mesh_batch_not_divisible", "--batch-size 3 cannot be split over the 2 batch shards"),
        ("mesh_experts_not_divisible", "expert axis must divide the preset's 8 experts"),
        ("resume_without_checkpoints", "holds no checkpoint"),
        ("zero_steps", "--steps must be a positive integer, got 0"),
        ("negative_seed", "--seed must be an integer >= 0, got -1"),
        ("unknown_preset", "Unknown preset 'glam_smal_16e'. Did you mean 'glam_small_16e'"),
        ("preset_is_a_file", "is a file, not a preset directory"),
        ("preset_directory_without_config", "is not a preset directory: it has no config.json"),
        ("preset_is_an_earlier_run", "no config.json. Did you mean .*earlier/preset\\?"),
        ("preset_config_unreadable", "config.json' is not a readable preset config"),
        ("preset_of_another_model", "holds a keras_hub>GemmaBackbone preset, not a GLaM one"),
        ("preset_without_tokenizer", "holds no tokenizer .* Pass --vocabulary"),
        ("preset_without_vocabulary", "glam_64b_64e is an architecture without a vocabulary"),
        ("preset_remote_handle", "is a remote handle.* pass the directory"),
        ("output_is_a_file", "--output .*run.txt is a file, not a directory"),
        ("output_under_a_file", "--output .* lies under .*file, which is a file"),
        ("output_unwritable", "--output .*: cannot write in "),
    ],
)
def test_bad_input_is_one_line_before_anything_is_built(tmp_path, capsys, case, message):
    arguments = ["--quick", "--output", str(tmp_path / "run")]
    arguments += _bad_input_arguments(case, tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert train.main(arguments) == 2
    captured = capsys.readouterr()
    _assert_one_line_error(captured.err, message)
    assert captured.out == ""
    assert sorted(tmp_path.rglob("*")) == before  # No output, no leftover write check.


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--steps", "many"], "argument --steps: invalid int value: 'many'. See glam-train --help"),
        (["--stepz", "3"], "unrecognized arguments: --stepz 3"),
        (["--verbose", "4"], "argument --verbose: invalid choice: 4"),
    ],
)
def test_a_bad_command_line_is_one_line(capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(arguments)
    assert exit_info.value.code == 2
    _assert_one_line_error(capsys.readouterr().err, message)


def test_user_errors_are_told_from_bugs():
    """Errors keras_glam raises, and the operating system's, are the user's to fix (one line);
    the same types raised inside a library are bugs and keep their traceback."""

    def raised(function):
        try:
            function()
        except Exception as error:  # noqa: BLE001 - any error is what is examined.
            return error

    ours = raised(lambda: presets.local_backbone_config("glam_nonexistent"))
    assert cli_support.user_error_message(ours).startswith("Unknown preset 'glam_nonexistent'.")
    full_disk = OSError(28, "No space left on device", "glam_run/metrics.json")
    assert cli_support.user_error_message(full_disk) == (
        "No space left on device (glam_run/metrics.json). Free some space, then continue with "
        "--resume."
    )
    assert cli_support.user_error_message(raised(lambda: json.loads("{"))) is None
    assert cli_support.user_error_message(raised(lambda: np.zeros(2).reshape(3))) is None
    assert cli_support.user_error_message(KeyError("token_ids")) is None


def test_prepare_streams_text_files_with_bounded_reads(tmp_path):
    paragraphs = [f"Paragraph {i} says that the value of x is {i} times y." for i in range(30)]
    first = _write(tmp_path / "a.txt", "\n\n".join(paragraphs[:20]) + "\n")
    _write(tmp_path / "b.txt", "\n\n\n".join(paragraphs[20:]))
    pattern = str(tmp_path / "b*.txt")
    arguments = ["--quick", "--output", str(tmp_path / "run"), "--baseline-tokens", "4096"]
    data = main_job.prepare(train.parse_args([*arguments, "--data", first, pattern]))
    (source,) = data.data.sources
    assert source.files == [first, str(tmp_path / "b.txt")]  # Two specs named "data": one source.
    held_out = {t.decode() for t in data.data.held_out_texts().as_numpy_iterator()}
    training = {t.decode() for t in data.data.split_documents(source).as_numpy_iterator()}
    assert held_out and training and held_out.isdisjoint(training)
    assert held_out | training == set(paragraphs)  # Paragraphs, from both files.
    x, y, sample_weight = next(iter(data.data.training_dataset(seed=0)))
    assert tuple(x["token_ids"].shape) == (4, 32) == tuple(y.shape) == tuple(sample_weight.shape)
    assert data.held_out_tokens == sum(w.sum() for _, _, w in data.held_out.as_numpy_iterator())
    assert 0 < data.unigram_entropy < np.log(4096)
    assert not (tmp_path / "run").exists()


def test_the_training_split_is_measured_by_a_bounded_read(tmp_path, monkeypatch):
    """`training_tokens` stops at one batch: a huge corpus is not read through."""
    from keras_glam.data import sources

    read = []
    original = sources.JsonLines._parse
    monkeypatch.setattr(
        sources.JsonLines, "_parse", lambda self, *args: read.append(1) or original(self, *args)
    )
    with open(tmp_path / "big.jsonl", "w") as file:
        for i in range(20000):
            file.write(json.dumps({"text": f"Line {i} of a corpus far larger than one batch."}) + "\n")
    job = train.parse_args(["--quick", "--data", str(tmp_path / "big.jsonl")])
    data = main_job.streaming_data(job, main_job.load_tokenizer(job))
    assert data.training_tokens(at_most=4 * 32) >= 4 * 32
    assert len(read) <= 8  # Blocks of 256 lines (with read-ahead) of the file's 79.


def _imported_packages(stderr):
    """Top-level packages named in the `python -X importtime` report on `stderr`."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in stderr.splitlines()
        if line.startswith("import time:")
    }


def _our_help(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    return capsys.readouterr().out


def test_help_is_instant_and_shows_only_our_help(monkeypatch, capsys):
    environment = {**_USER_ENVIRONMENT, "COLUMNS": "100"}
    command = [sys.executable, "-m", "keras_glam.train", "--help"]
    result = subprocess.run(
        command, env=environment, cwd=_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert result.stderr == ""  # No TensorFlow, XLA or absl lines.
    assert result.stdout == _our_help(monkeypatch, capsys)
    assert result.stdout.startswith("usage: glam-train ")

    # Instant: nothing heavy is imported before the arguments are parsed.
    timed = subprocess.run(
        [sys.executable, "-X", "importtime", *command[1:]],
        env=environment,
        cwd=_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    imported = _imported_packages(timed.stderr)
    assert "keras_glam" in imported
    assert not imported & {"keras", "keras_hub", "jax", "tensorflow", "numpy"}, imported


def test_console_command_help_is_clean(monkeypatch, capsys):
    command = os.path.join(os.path.dirname(sys.executable), "glam-train")
    if not os.path.isfile(command):
        pytest.skip("the glam-train command is not installed next to this Python")
    environment = {**_USER_ENVIRONMENT, "COLUMNS": "100"}
    result = subprocess.run(
        [command, "--help"], env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == _our_help(monkeypatch, capsys)


@pytest.mark.slow
def test_an_error_after_the_libraries_load_is_still_one_line(tmp_path):
    """TensorFlow, XLA and SentencePiece print banners and notes from native code as they
    load; a user sees only our line."""
    output = _write(tmp_path / "run", "")
    command = [sys.executable, "-m", "keras_glam.train", "--quick", "--output", output]
    result = subprocess.run(
        command, env=_USER_ENVIRONMENT, cwd=_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and result.stdout == ""
    _assert_one_line_error(result.stderr, "--output .*run is a file, not a directory")


def _saved_tiny_preset(directory, config):
    """A GLaM of `config` with the shipped 4096-piece vocabulary, saved with `save_to_preset`."""
    import keras_glam

    backbone = keras_glam.GLaMBackbone(**{**config, "vocabulary_size": 4096})
    preprocessor = keras_glam.GLaMCausalLMPreprocessor.from_preset("glam_tiny_8e")
    keras_glam.GLaMCausalLM(backbone, preprocessor=preprocessor).save_to_preset(str(directory))
    return backbone


def _arrays(path):
    """The weight tensors in a `.weights.h5` file, in a canonical order (the names differ
    between a backbone's and a task's files; a task's also holds scalar training counters)."""
    arrays = [array for array in _weights(path).values() if np.ndim(array) > 0]
    return sorted(arrays, key=lambda array: (array.shape, array.tobytes()))


@pytest.mark.slow
def test_training_starts_from_a_saved_preset_directory(tmp_path, capsys, tiny_config):
    preset = tmp_path / "my_glam"
    backbone = _saved_tiny_preset(preset, tiny_config)
    output = tmp_path / "run"
    arguments = ["--preset", str(preset), "--output", str(output), "--verbose", "0"]
    arguments += ["--steps", "2", "--checkpoint-interval", "2", "--batch-size", "2"]
    paragraphs = [f"Paragraph {i}: the value of x is {i} times y." for i in range(40)]
    arguments += ["--data", _write(tmp_path / "text.txt", "\n\n".join(paragraphs))]
    arguments += ["--sequence-length", "16", "--samples", "0", "--baseline-tokens", "4096"]
    assert train.main(arguments) == 0, capsys.readouterr().err
    with open(output / "metrics.json") as file:
        metrics = json.load(file)
    assert metrics["steps"] == 2 and np.isfinite(metrics["held_out_cross_entropy"])
    with open(output / "preset" / "config.json") as file:
        trained_config = json.load(file)["config"]
    for key, value in backbone.get_config().items():
        if key not in ("name", "dtype"):
            assert trained_config[key] == value, key
    # The run began from the saved weights: its first checkpoint (step 0) holds them.
    first = sorted((output / "checkpoints").iterdir())[0]
    saved, started = _arrays(preset / "model.weights.h5"), _arrays(first / "model.weights.h5")
    assert len(saved) == len(started) == len(backbone.weights)
    for expected, actual in zip(saved, started):
        np.testing.assert_array_equal(expected, actual)


def test_a_diverged_run_is_one_line(tmp_path, capsys, monkeypatch):
    """Every chunk fails its health check: the trainer rolls back until it gives up."""

    def failing_segment(trainer, state):
        return ChunkFailure("loss is nan", state.data_position)

    monkeypatch.setattr(main_job.Trainer, "_run_segment", failing_segment)
    arguments = ["--quick", "--output", str(tmp_path / "run"), "--samples", "0", "--verbose", "0"]
    assert train.main(arguments) == 2
    captured = capsys.readouterr()
    _assert_one_line_error(
        captured.err, "Training failed .*\\(loss is nan\\).* Lower the learning rate"
    )


def test_an_interrupted_run_says_how_to_continue(tmp_path, capsys, monkeypatch):
    def interrupted(job, distribution):
        raise KeyboardInterrupt

    monkeypatch.setattr(main_job, "prepare", interrupted)
    assert train.main(["--quick", "--output", str(tmp_path / "run")]) == 130
    error = capsys.readouterr().err
    assert error == (
        "glam-train: interrupted. Checkpoints already written are kept: continue with --resume.\n"
    )


def _weights(path):
    values = {}
    with h5py.File(path, "r") as file:
        file.visititems(
            lambda name, item: values.__setitem__(name, item[()])
            if isinstance(item, h5py.Dataset)
            else None
        )
    return values


def _job(output, *extra):
    return [
        sys.executable,
        "-m",
        "keras_glam.train",
        "--quick",
        "--steps",
        "60",
        "--checkpoint-interval",
        "5",
        "--samples",
        "0",
        "--verbose",
        "0",
        "--output",
        str(output),
        *extra,
    ]


def _write_jsonl_shards(directory, sources=("data",), shards=3, lines=300):
    """JSON lines shards `<source>-<shard>.jsonl` of paragraphs of Python's documentation."""
    from keras_glam.data.embedded_corpus import pydoc_documents

    paragraphs = [p for page in pydoc_documents() for p in page.split("\n\n") if p.strip()]
    directory.mkdir()
    index = 0
    for source in sources:
        for shard in range(shards):
            with open(directory / f"{source}-{shard}.jsonl", "w") as file:
                for _ in range(lines):
                    file.write(json.dumps({"text": paragraphs[index % len(paragraphs)]}) + "\n")
                    index += 1
    return directory


def _shard_with_a_bad_line(tmp_path, good_lines=2000):
    """A JSON lines shard whose line `good_lines + 1` has no text field, deep past what start-up
    reads with few held-out documents and a small baseline."""
    lines = [json.dumps({"text": f"Word {i} is here."}) for i in range(good_lines + 500)]
    lines[good_lines] = json.dumps({"body": "no text here"})
    return _write(tmp_path / "deep.jsonl", "\n".join(lines) + "\n")


def test_a_bad_line_met_in_training_is_one_line_and_keeps_the_checkpoints(tmp_path, capsys):
    output = tmp_path / "run"
    arguments = ["--quick", "--output", str(output), "--samples", "0", "--verbose", "0"]
    arguments += ["--data", _shard_with_a_bad_line(tmp_path), "--held-out-documents", "20"]
    arguments += ["--baseline-tokens", "1024", "--shuffle-buffer", "16", "--steps", "60"]
    arguments += ["--batch-size", "16", "--sequence-length", "64"]
    assert train.main(arguments) == 2
    _assert_one_line_error(
        capsys.readouterr().err, "deep.jsonl: line 2001 has no text field 'text' \\(found: body\\)"
    )
    checkpoints = sorted(path.name for path in (output / "checkpoints").iterdir())
    assert len(checkpoints) >= 2  # Training began (step 0) and went on before the bad line.


def test_a_bad_line_met_reading_the_held_out_set_is_one_line(tmp_path, capsys):
    arguments = ["--quick", "--output", str(tmp_path / "run"), "--samples", "0"]
    arguments += ["--data", _shard_with_a_bad_line(tmp_path), "--held-out-documents", "1000"]
    assert train.main(arguments) == 2
    _assert_one_line_error(capsys.readouterr().err, "deep.jsonl: line 2001 has no text field")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_after_kill_9_matches_an_uninterrupted_run(tmp_path):
    """From JSON lines shards: the resumed run continues the data stream from the state its
    checkpoint saved, and ends with the same weights, bit for bit."""
    shards = _write_jsonl_shards(tmp_path / "shards")
    environment = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=_ROOT)
    data = ["--data", str(shards / "*.jsonl"), "--shuffle-buffer", "64"]
    run = lambda output, *args: subprocess.run(  # noqa: E731
        _job(output, *data, *args), env=environment, cwd=_ROOT, capture_output=True, text=True,
        timeout=600,
    )
    uninterrupted = run(tmp_path / "uninterrupted")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    killed_output = tmp_path / "killed"
    process = subprocess.Popen(
        _job(killed_output, *data),
        env=environment,
        cwd=_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = killed_output / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        steps = [
            int(name.rsplit("-", 1)[1])
            for name in (os.listdir(checkpoints) if checkpoints.is_dir() else [])
            if name.startswith("ckpt-")
        ]
        if steps and max(steps) >= 10:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed_output / "preset").exists()

    resumed = run(killed_output, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr
    newest = sorted((killed_output / "checkpoints").iterdir())[-1]
    assert {"data_iterator.index", "data_iterator.json", "data_pending.npz"} <= {
        path.name for path in newest.iterdir()
    }

    expected = _weights(tmp_path / "uninterrupted" / "preset" / "model.weights.h5")
    actual = _weights(killed_output / "preset" / "model.weights.h5")
    assert expected.keys() == actual.keys() and expected
    for name in expected:
        np.testing.assert_array_equal(expected[name], actual[name], err_msg=name)


@pytest.mark.slow
def test_training_on_a_weighted_mixture_of_jsonl_shards(tmp_path, capsys):
    shards = _write_jsonl_shards(tmp_path / "shards", sources=("web", "books"), lines=100)
    output = tmp_path / "run"
    arguments = ["--quick", "--steps", "2", "--checkpoint-interval", "2", "--samples", "0"]
    arguments += ["--output", str(output), "--verbose", "0", "--baseline-tokens", "4096"]
    arguments += ["--data", f"web={shards}/web-*.jsonl", f"books={shards}/books-*.jsonl"]
    arguments += ["--mixture", "web=0.7,books=0.3", "--held-out-documents", "20"]
    assert train.main(arguments) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "streaming 70% web (JsonLines, 3 files) + 30% books (JsonLines, 3 files)" in out
    with open(output / "metrics.json") as file:
        metrics = json.load(file)
    assert metrics["steps"] == 2 and np.isfinite(metrics["held_out_cross_entropy"])
    assert 3.0 < metrics["unigram_entropy"] < np.log(4096)
    newest = sorted((output / "checkpoints").iterdir())[-1]
    with open(newest / "data_iterator.json") as file:
        fingerprint = json.loads(json.load(file)["fingerprint"])
    assert fingerprint["weights"] == [0.7, 0.3] and len(fingerprint["sources"]) == 2


@pytest.mark.slow
def test_expert_parallel_run_on_four_cpu_devices(tmp_path):
    environment = dict(
        os.environ,
        KERAS_BACKEND="jax",
        PYTHONPATH=_ROOT,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
    )
    command = [
        sys.executable,
        "-m",
        "keras_glam.train",
        "--quick",
        "--mesh",
        "data=2,expert=2",
        "--verbose",
        "0",
        "--output",
        str(tmp_path / "run"),
    ]
    result = subprocess.run(
        command, env=environment, cwd=_ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.json") as file:
        metrics = json.load(file)
    assert metrics["steps"] == 6 and np.isfinite(metrics["held_out_cross_entropy"])
    assert len(metrics["samples"]) == 2
