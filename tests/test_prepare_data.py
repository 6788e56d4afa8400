"""`glam-data`: train the quality filter, filter corpora into shards with a report; bad input
ends with one line and exit status 2."""

import json

import pytest

from keras_glam import prepare_data
from keras_glam.data.sources import JsonLines

CURATED = [
    f"The {topic} section of the manual explains how the interpreter handles {topic} in "
    f"programs, with an example of typical use number {i}."
    for i, topic in enumerate(["modules", "classes", "exceptions", "generators"] * 12)
]
WEB = [
    f"click here buy now {i} free casino bonus | home | login | cart | {'win ' * (i % 5)}"
    for i in range(48)
]


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return str(path)


@pytest.fixture(scope="module")
def trained_filter(tmp_path_factory):
    root = tmp_path_factory.mktemp("filter")
    curated = _jsonl(root / "curated.jsonl", CURATED)
    web = _jsonl(root / "web.jsonl", WEB)
    model = str(root / "filter.keras")
    status = prepare_data.main([
        "train-filter", "--positive", curated, "--negative", web, "--output", model,
        "--num-bins", "4096", "--max-features", "64", "--epochs", "8", "--batch-size", "16",
        "--learning-rate", "0.1", "--validation-fraction", "0.25", "--report",
        str(root / "metrics.json"),
    ])
    assert status == 0
    return root, model


def test_train_filter_saves_a_model_and_metrics(trained_filter, capsys):
    root, model = trained_filter
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["auc"] > 0.9
    scores = metrics["mean_validation_score"]
    assert scores["positive"] > scores["negative"]


def test_filter_writes_shards_and_a_report(trained_filter, tmp_path, capsys):
    root, model = trained_filter
    mixed = _jsonl(tmp_path / "mixed.jsonl", CURATED + WEB)
    output = tmp_path / "filtered"
    status = prepare_data.main([
        "filter", "--model", model, "--data", f"crawl={mixed}", "--output", str(output),
        "--documents-per-shard", "10",
    ])
    assert status == 0, capsys.readouterr().err
    report = json.loads((output / "report.json").read_text())
    entry = report["sources"]["crawl"]
    shards = JsonLines(str(output / "crawl" / "*.jsonl")).documents()
    kept = [t.decode() for t in shards.as_numpy_iterator()]
    assert entry["documents"] == len(CURATED) + len(WEB) == sum(entry["histogram"]["all"])
    assert entry["kept"] == len(kept) == sum(entry["histogram"]["kept"])
    assert entry["kept_fraction"] == pytest.approx(len(kept) / entry["documents"])
    assert len(entry["shards"]) == -(-len(kept) // 10)
    assert sum(t in CURATED for t in kept) > 5 * max(1, sum(t in WEB for t in kept))
    assert (output / "scores.png").stat().st_size > 1000
    assert "crawl: kept" in capsys.readouterr().out


def _fails_with(argv, capsys, message):
    assert prepare_data.main(argv) == 2
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert error.startswith("glam-data: error: ") and message in error, error
    assert "\n" not in error and "Traceback" not in captured.err


def test_bad_input_is_one_line_and_exit_2(trained_filter, tmp_path, capsys):
    root, model = trained_filter
    good = _jsonl(tmp_path / "good.jsonl", CURATED[:3])
    _fails_with(["filter", "--model", model, "--data", str(tmp_path / "none-*.jsonl"),
                 "--output", str(tmp_path / "out1")], capsys, "no file matches")
    (tmp_path / "field.jsonl").write_text('{"body": "text under another key"}\n')
    _fails_with(["filter", "--model", model, "--data", str(tmp_path / "field.jsonl"),
                 "--output", str(tmp_path / "out2")], capsys, "line 1 has no text field 'text'")
    _fails_with(["filter", "--model", str(tmp_path / "missing.keras"), "--data", good,
                 "--output", str(tmp_path / "out3")], capsys, "No quality classifier at")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("precious")
    _fails_with(["filter", "--model", model, "--data", good, "--output", str(tmp_path / "busy")],
                capsys, "already holds files (nothing was changed)")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "precious"
    _fails_with(["train-filter", "--positive", good, "--negative", good, "--output", model],
                capsys, "already exists (nothing was changed)")


def test_a_source_left_empty_is_an_error_after_the_report(trained_filter, tmp_path, capsys):
    root, model = trained_filter
    web = _jsonl(tmp_path / "web.jsonl", WEB)
    curated = _jsonl(tmp_path / "curated.jsonl", CURATED)
    output = tmp_path / "filtered"
    _fails_with(["filter", "--model", model, "--data", f"wiki={curated}", f"spam={web}",
                 "--output", str(output), "--alpha", "200"],
                capsys, "the filter kept no document of spam (48 documents)")
    report = json.loads((output / "report.json").read_text())
    assert report["sources"]["wiki"]["kept"] > 0 and report["sources"]["spam"]["kept"] == 0
    assert (output / "wiki" / "wiki-00000.jsonl").exists()
