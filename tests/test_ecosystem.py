"""keras_glam in the Keras ecosystem: attribute access to subpackages, keras-nlp, KerasHub."""

import subprocess
import sys

import pytest


def _run(code):
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=300, env={"KERAS_BACKEND": "jax", "PATH": ""})
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout.split()


@pytest.mark.slow
def test_subpackages_are_attributes_imported_on_first_use():
    """`import keras_glam` loads no room above the models; each loads when first named."""
    names = ["callbacks", "data", "distribution", "evaluation", "hub", "training"]
    output = _run(
        "import sys, keras_glam\n"
        f"names = {names}\n"
        "print(*[f'keras_glam.{n}' in sys.modules for n in names])\n"
        "print(*[type(getattr(keras_glam, n)).__name__ for n in names])\n"
        "print(keras_glam.callbacks.HubCheckpoint.__name__, keras_glam.training.Trainer.__name__)"
    )
    assert output[: len(names)] == ["False"] * len(names)
    assert output[len(names): 2 * len(names)] == ["module"] * len(names)
    assert output[-2:] == ["HubCheckpoint", "Trainer"]


def test_unknown_attribute_is_an_attribute_error():
    import keras_glam

    with pytest.raises(AttributeError, match="no attribute 'trainer'"):
        keras_glam.trainer  # noqa: B018


@pytest.mark.slow
def test_keras_nlp_loads_a_glam_preset(tmp_path):
    """keras-nlp (the requested dependency) is keras-hub under its old name: it finds GLaM."""
    import keras_nlp
    import numpy as np

    import keras_glam

    lm = keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e")
    lm.save_to_preset(tmp_path / "preset")
    loaded = keras_nlp.models.CausalLM.from_preset(str(tmp_path / "preset"))
    assert type(loaded) is keras_glam.GLaMCausalLM
    x = {"token_ids": np.array([[2, 7, 9, 4]]), "padding_mask": np.ones((1, 4), bool)}
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(lm(x)))
