"""keras_glam: GLaM, Google's mixture-of-experts language model, for Keras 3 and KerasHub."""

import importlib
import os
import sys

from keras_glam.version import __version__

# GLaM's sparse dispatch and expert sharding are written for JAX (keras.distribution is JAX-only
# in Keras 3.15). Choose it when the user has not chosen a backend and keras is not yet loaded.
if "keras" not in sys.modules:
    os.environ.setdefault("KERAS_BACKEND", "jax")

# Public name -> the module that defines it. Loaded with the package (see the end of this file).
_PUBLIC = {
    "GLaMBackbone": "keras_glam.models",
    "GLaMCausalLM": "keras_glam.models",
    "GLaMCausalLMPreprocessor": "keras_glam.models",
    "GLaMTokenizer": "keras_glam.models",
    "count_params": "keras_glam.models",
    "flops_per_token": "keras_glam.models",
    "layers": "keras_glam.layers",
}
# Subpackages reachable as attributes (as `keras.callbacks` is after `import keras`), each
# imported on first use: model-only code never pays for tf.data, the Hub client or lm-eval.
_SUBPACKAGES = ("callbacks", "data", "distribution", "evaluation", "hub", "models",
                "optimizers", "training")

__all__ = [*_PUBLIC, *_SUBPACKAGES, "__version__"]


def __getattr__(name):
    """A public name or subpackage, imported on first use."""
    if name in _SUBPACKAGES:
        value = importlib.import_module(f"keras_glam.{name}")
    elif name in _PUBLIC:
        module = importlib.import_module(_PUBLIC[name])
        value = module if module.__name__ == f"keras_glam.{name}" else getattr(module, name)
    else:
        raise AttributeError(f"module 'keras_glam' has no attribute '{name}'")
    globals()[name] = value
    return value


def _starting_a_command():
    """Whether this import starts `python -m keras_glam.<module>` or a `glam-*` command.

    A command parses its arguments and quiets TensorFlow's start-up logs before it imports
    Keras, JAX and TensorFlow (an instant, clean `--help`), so the package must not import
    them first. Python sets `sys.argv[0]` to "-m" while it imports the packages of the module
    it is about to run.
    """
    program = sys.argv[0] if sys.argv else ""
    return program == "-m" or os.path.basename(program).startswith("glam-")


if not _starting_a_command():
    # Importing the models registers the GLaM classes with Keras, so that keras_hub's generic
    # loaders (`keras_hub.models.CausalLM.from_preset`) find them after `import keras_glam`.
    for _name in _PUBLIC:
        __getattr__(_name)
