"""The `>>>` examples in the docstrings run and print what they show."""

import doctest
import importlib

import pytest

MODULES_WITH_EXAMPLES = [
    "keras_glam.layers.expert_loop",
    "keras_glam.layers.moe_feedforward",
    "keras_glam.layers.routing",
    "keras_glam.models.glam_backbone",
]


@pytest.mark.parametrize("module_name", MODULES_WITH_EXAMPLES)
def test_docstring_examples(module_name):
    results = doctest.testmod(importlib.import_module(module_name), optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0
    assert results.failed == 0
