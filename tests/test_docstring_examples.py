"""The `>>>` examples in the docstrings run and print what they show."""

import doctest
import importlib

import pytest

MODULES_WITH_EXAMPLES = [
    "keras_glam.layers.expert_einsum_dense",
    "keras_glam.layers.expert_loop",
    "keras_glam.layers.independent_initializer",
    "keras_glam.layers.moe_feedforward",
    "keras_glam.layers.routing",
    "keras_glam.optimizers.adafactor",
    "keras_glam.optimizers.recipe",
    "keras_glam.optimizers.schedules",
    "keras_glam.optimizers.skip_nonfinite",
    "keras_glam.models.architecture",
    "keras_glam.models.flops",
    "keras_glam.models.glam_tokenizer",
    "keras_glam.models.layout_rules",
    "keras_glam.models.losses",
    "keras_glam.models.presets",
    "keras_glam.training.compute_meter",
    "keras_glam.data.packing",
    "keras_glam.evaluation.token_scorer",
    "keras_glam.distribution.compute_bill",
    "keras_glam.distribution.expert_parallel",
    "keras_glam.distribution.planner",
    "keras_glam.utils.atomic_files",
    "keras_glam.cli_support",
]


@pytest.mark.parametrize("module_name", MODULES_WITH_EXAMPLES)
def test_docstring_examples(module_name):
    results = doctest.testmod(importlib.import_module(module_name), optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0
    assert results.failed == 0
