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
