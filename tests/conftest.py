"""Test configuration: JAX backend, one CPU device, deterministic seeds."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest_plugins = ("hub_server",)


@pytest.fixture(autouse=True)
def _seed_everything():
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


TINY_CONFIG = {
    "vocabulary_size": 97,
    "num_layers": 3,
    "hidden_dim": 16,
    "intermediate_dim": 32,
    "num_heads": 2,
    "head_dim": 8,
    "num_experts": 4,
}


@pytest.fixture
def tiny_config():
    """A 3-layer GLaM (MoE on layers 0 and 2) small enough for every test."""
    return dict(TINY_CONFIG)


@pytest.fixture
def parsed_lines(monkeypatch):
    """Counts the JSON lines parsed (`JsonLines._parse`), as `[count of each call]`, in the
    pipelines built from now on."""
    from keras_glam.data import sources

    counts = []
    parse = sources.JsonLines._parse

    def counting_parse(self, path, numbers, lines):
        counts.append(len(numbers))
        return parse(self, path, numbers, lines)

    monkeypatch.setattr(sources.JsonLines, "_parse", counting_parse)
    return counts
