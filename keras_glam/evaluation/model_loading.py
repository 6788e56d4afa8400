"""The model an evaluation scores: a `GLaMCausalLM` with its tokenizer, on the JAX backend."""

import os

import keras

from keras_glam.models import presets
from keras_glam.models.glam_causal_lm import GLaMCausalLM

INSTALL_HINT = 'pip install "keras-glam[eval]"'


def load_causal_lm(model):
    """A `GLaMCausalLM` ready to score text: the model itself, or one loaded from a handle.

    Evaluation turns text into token ids and back, so the model needs its tokenizer; the
    paper-size presets ship none (GLaM's vocabulary was never published) and are refused before
    any weight is allocated. Scoring and decoding are compiled with `jax.jit`.

    Args:
        model: a `GLaMCausalLM`, or a preset handle (a builtin name such as `"glam_small_16e"`,
            a preset directory, `"hf://org/name"`).

    Returns:
        The `GLaMCausalLM`.

    Raises:
        ValueError: the model has no tokenizer, or Keras does not run on JAX.

    Example:
    ```python
    causal_lm = load_causal_lm("glam_tiny_8e")
    causal_lm.preprocessor.tokenizer.start_token_id  # 2
    ```
    """
    if keras.config.backend() != "jax":
        raise ValueError(
            f"keras_glam.evaluation compiles with JAX, but Keras runs on "
            f"'{keras.config.backend()}'. Set KERAS_BACKEND=jax before importing keras."
        )
    if isinstance(model, GLaMCausalLM):
        causal_lm = model
    elif isinstance(model, (str, os.PathLike)):
        handle = os.fspath(model)
        if presets.builtin_preset_directory(
            handle
        ) is not None and not presets.builtin_preset_has_tokenizer(handle):
            raise _no_tokenizer_error(handle)
        causal_lm = GLaMCausalLM.from_preset(handle)
    else:
        raise TypeError(
            "model must be a GLaMCausalLM or a preset handle (a builtin name, a directory, "
            f"hf://org/name), got {type(model).__name__}."
        )
    if causal_lm.preprocessor is None:
        raise _no_tokenizer_error(getattr(causal_lm, "name", "the model"))
    return causal_lm


def _no_tokenizer_error(name):
    return ValueError(
        f"{name} has no tokenizer, and evaluation needs one to turn text into tokens (the "
        "paper-size presets ship none: GLaM's vocabulary was never published). Evaluate a model "
        "with a tokenizer: a small preset such as glam_small_16e, or a preset saved by glam-train."
    )
