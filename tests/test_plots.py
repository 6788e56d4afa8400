"""Plots are written without switching the process's matplotlib backend (notebooks keep theirs)."""

import matplotlib
import numpy as np
import pytest

from keras_glam.training.plots import plot_training


@pytest.fixture
def svg_backend():
    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    yield
    matplotlib.use(previous)


def test_training_plot_keeps_the_backend_and_writes_a_png(tmp_path, svg_backend):
    state = {
        "step_losses": [[step, 5.0 - step / 50] for step in range(1, 101)],
        "chunk_logs": [{"step": 50, "cross_entropy": 4.1, "val_cross_entropy": 4.3},
                       {"step": 100, "cross_entropy": 3.2, "val_cross_entropy": 3.5}],
        "expert_load": [[100, np.full((2, 4), 0.25).tolist()]],
    }
    plot_training(state, tmp_path / "training.png", unigram_entropy=4.9)
    assert matplotlib.get_backend() == "svg"
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluation_plot_keeps_the_backend(svg_backend):
    from keras_glam.evaluation.reports import plot_report

    runs = [{"num_fewshot": 0, "n-shot": {"arc_easy": 0},
             "results": {"arc_easy": {"acc,none": 0.5, "acc_per_token,none": 0.55}}}]
    png = plot_report(runs, "glam_tiny_8e")
    assert matplotlib.get_backend() == "svg"
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_quality_report_plot_keeps_the_backend(tmp_path, svg_backend):
    from keras_glam.prepare_data import plot_score_histograms

    report = {"alpha": 9.0, "sources": {"web": {
        "histogram": {"edges": [0.0, 0.5, 1.0], "all": [3, 4], "kept": [1, 4]},
        "kept_fraction": 0.71}}}
    plot_score_histograms(report, tmp_path / "scores.png")
    assert matplotlib.get_backend() == "svg"
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
