"""Refuse to build a model that cannot fit, before a single weight is allocated.

Allocating a 1.2T-parameter preset on a laptop would otherwise swap or freeze the machine; an
immediate error with the numbers is kinder.
"""

import os

import keras

from keras_glam.models.architecture import weight_shapes


def available_memory_bytes():
    """Bytes that new weights can use: free accelerator memory, or the host's available RAM."""
    if keras.backend.backend() == "jax":
        import jax

        devices = jax.local_devices()
        if devices and devices[0].platform != "cpu":
            total = 0
            for device in devices:
                stats = device.memory_stats() or {}
                total += stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
            if total > 0:
                return total
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits_in_memory(config, variable_dtype="float32"):
    """Raise `MemoryError` when the model's weights alone exceed the available memory.

    The weights are those of `keras_glam.models.architecture.weight_shapes` (padded embedding
    rows, float32 router and routing statistics included), in `variable_dtype` unless pinned.

    Returns:
        `(estimated, available)` bytes.
    """
    weights = weight_shapes(config)
    total = sum(weight.size for weight in weights if weight.trainable)
    weight_bytes = sum(
        weight.size * bytes_per_element(weight.dtype or variable_dtype) for weight in weights
    )
    # On several hosts each one holds its share of the (sharded) weights.
    estimated = weight_bytes // _process_count()
    available = available_memory_bytes()
    if estimated > available:
        raise MemoryError(
            f"This GLaM model has {total:,} parameters: its {variable_dtype} weights alone need "
            f"about {estimated / 2**30:,.1f} GiB, but only {available / 2**30:,.1f} GiB is "
            "available. Build it under a keras.distribution that shards it over enough "
            "devices (see keras_glam.distribution), or pick a smaller preset."
        )
    return estimated, available


def _process_count():
    if keras.backend.backend() == "jax":
        import jax

        return jax.process_count()
    return 1


def bytes_per_element(dtype):
    """Bytes of one element of a float `dtype` (`"float32"`, `"bfloat16"`, ...)."""
    sizes = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
    dtype = keras.backend.standardize_dtype(dtype)
    if dtype not in sizes:
        raise ValueError(f"Expected a float dtype ({', '.join(sizes)}), got '{dtype}'.")
    return sizes[dtype]
