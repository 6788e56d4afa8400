"""Eager checks of user inputs that compiled code cannot make (XLA clamps bad indices)."""

import keras
import numpy as np


def _concrete(value):
    """`value` as a NumPy array, or None while it is symbolic or traced."""
    if value is None or keras.backend.is_keras_tensor(value):
        return None
    if keras.backend.backend() == "jax":
        import jax

        if isinstance(value, jax.core.Tracer):
            return None
    try:
        return np.asarray(value)
    except Exception:  # A graph tensor of another backend: checked elsewhere, if at all.
        return None


def check_token_ids(inputs, vocabulary_size):
    """Raise `ValueError` if concrete token ids fall outside `[0, vocabulary_size)`."""
    token_ids = inputs.get("token_ids") if isinstance(inputs, dict) else inputs
    ids = _concrete(token_ids)
    if ids is None or ids.size == 0:
        return
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"token_ids must be integers, got dtype {ids.dtype}.")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocabulary_size:
        raise ValueError(
            f"token_ids must lie in [0, {vocabulary_size}) for this model's vocabulary of "
            f"{vocabulary_size}, got values from {low} to {high}. Tokenize with the model's "
            "own tokenizer (its preprocessor), or use a model whose vocabulary_size matches "
            "your tokenizer."
        )
