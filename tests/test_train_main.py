"""The main job, `python -m keras_glam.train`: a quick run, bad input, and resume after kill -9."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from keras_glam import train

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    ):
        assert np.isfinite(metrics[key]), key
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


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty_file", "hold no text"),
        ("latin1_file", "is not UTF-8 text: byte 14 \\(line 2\\)"),
        ("one_document", "at least 2"),
        ("nothing_held_out", "no whole document to hold out"),
        ("too_little_text", "fewer than one batch"),
        ("missing_file", "no file matches"),
        ("vocabulary_mismatch", "The tokenizer has 600 tokens but preset 'glam_tiny_8e'"),
        ("mesh_too_big", "needs 4 devices, there are 1"),
        ("mesh_bad_axis", "axis=size pairs over the axes data, expert, model"),
        ("resume_without_checkpoints", "holds no checkpoint"),
    ],
)
def test_bad_input_is_reported_before_anything_is_built(tmp_path, capsys, case, message):
    output = tmp_path / "run"
    arguments = ["--quick", "--output", str(output)]
    if case == "empty_file":
        arguments += ["--data", _write(tmp_path / "empty.txt", "\n\n  \n")]
    elif case == "latin1_file":
        arguments += ["--data", _write(tmp_path / "latin1.txt", b"first line\ncaf\xe9 au lait\n")]
    elif case == "one_document":
        arguments += ["--data", _write(tmp_path / "one.txt", "A single paragraph of text.\n")]
    elif case == "nothing_held_out":
        arguments += ["--data", _write(tmp_path / "two.txt", "One paragraph.\n\nAnother.\n")]
    elif case == "too_little_text":
        six_words = "One.\n\nTwo.\n\nThree.\n\nFour.\n\nFive.\n\nSix.\n"
        arguments += ["--data", _write(tmp_path / "tiny.txt", six_words)]
    elif case == "missing_file":
        arguments += ["--data", str(tmp_path / "nowhere" / "*.txt")]
    elif case == "vocabulary_mismatch":
        arguments += ["--vocabulary", _train_vocabulary(tmp_path, 600)]
    elif case == "mesh_too_big":
        arguments += ["--mesh", "data=2,expert=2"]
    elif case == "mesh_bad_axis":
        arguments += ["--mesh", "data=2,experts=2"]
    elif case == "resume_without_checkpoints":
        arguments += ["--resume"]
    assert train.main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("glam-train: error:")
    assert re.search(message, error), error
    assert not output.exists()


def test_text_files_are_read_as_paragraph_documents(tmp_path):
    paragraphs = [f"Paragraph {i} says that the value of x is {i} times y." for i in range(10)]
    first = _write(tmp_path / "a.txt", "\n\n".join(paragraphs[:6]) + "\n")
    _write(tmp_path / "b.txt", "\n\n\n".join(paragraphs[6:]))
    pattern = str(tmp_path / "b*.txt")
    job = train.parse_args(["--quick", "--output", str(tmp_path / "run"), "--data", first, pattern])
    data = train.prepare(job)
    assert len(data.train_documents) == 8 and len(data.held_out_documents) == 2
    assert data.held_out_documents[0] == paragraphs[4]
    x, y, sample_weight = next(iter(data.make_dataset(seed=0, skip_batches=0)))
    assert tuple(x["token_ids"].shape) == (4, 32) == tuple(y.shape) == tuple(sample_weight.shape)
    assert 0 < data.unigram_entropy < np.log(4096)
    assert not (tmp_path / "run").exists()


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


@pytest.mark.slow
def test_resume_after_kill_9_matches_an_uninterrupted_run(tmp_path):
    environment = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=_ROOT)
    run = lambda *args: subprocess.run(  # noqa: E731
        _job(*args), env=environment, cwd=_ROOT, capture_output=True, text=True, timeout=600
    )
    uninterrupted = run(tmp_path / "uninterrupted")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    killed_output = tmp_path / "killed"
    process = subprocess.Popen(
        _job(killed_output),
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

    expected = _weights(tmp_path / "uninterrupted" / "preset" / "model.weights.h5")
    actual = _weights(killed_output / "preset" / "model.weights.h5")
    assert expected.keys() == actual.keys() and expected
    for name in expected:
        np.testing.assert_array_equal(expected[name], actual[name], err_msg=name)


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
