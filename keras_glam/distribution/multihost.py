"""Reading sharded values when several processes share one device mesh."""

import keras
import numpy as np


def gather_to_host(values):
    """Complete NumPy copies of `values` (Keras variables or arrays) on every process.

    With several processes (`keras.distribution.initialize`), a value laid out over devices of
    other processes cannot be read by one process alone, so `model.save_weights` fails on it.
    Such values are all-gathered (`jax.experimental.multihost_utils.process_allgather`): a
    collective, so every process must call this with the same values in the same order. Values
    a process holds in full are read directly.

    Args:
        values: iterable of `keras.Variable`s or arrays, e.g. `model.weights`.

    Returns:
        list of `np.ndarray`, the global values.

    Example:
    ```python
    weights = gather_to_host(lm.weights)  # on every process
    if jax.process_index() == 0:
        single_device_lm.set_weights(weights)
        single_device_lm.save_weights("model.weights.h5")
    ```
    """
    if keras.backend.backend() != "jax":
        return [keras.ops.convert_to_numpy(value) for value in values]
    import jax
    from jax.experimental import multihost_utils

    arrays = []
    for value in values:
        array = value.value if isinstance(value, keras.Variable) else value
        if isinstance(array, jax.Array) and not array.is_fully_addressable:
            array = multihost_utils.process_allgather(array, tiled=True)
        arrays.append(np.asarray(array))
    return arrays
