"""One initializer per weight, so that weights sharing an initializer argument are drawn apart."""

import zlib

import keras


def independent_initializer(identifier, weight_name):
    """A new initializer like `identifier` for one weight, drawing values of its own.

    A Keras random initializer built with `seed=None` fixes a concrete seed when it is
    constructed and reuses it on every call (`EinsumDense` even copies it into the clone it
    makes), so one instance given to two weights of equal size draws the same numbers twice: the
    second starts as a scaled copy of the first. Each weight therefore gets its own instance,
    rebuilt from the configuration. An unseeded initializer picks a new seed (reproducible under
    `keras.utils.set_random_seed`); a fixed integer seed is shifted by a number derived from
    `weight_name` (JAX's random bits depend on the seed and the flat index only, so two weights
    of any shapes drawn with one seed share their leading values), so the weights of one layer
    still differ and stay reproducible; an initializer seeded with a
    `keras.random.SeedGenerator` is returned as is, since the generator advances on every draw.

    Args:
        identifier: an initializer, its name or its serialized config.
        weight_name: the weight's name within its layer ("expert_wi", "router", ...).

    Returns:
        A `keras.initializers.Initializer`.

    Example:

    >>> shared = keras.initializers.LecunUniform()
    >>> first = independent_initializer(shared, "wi")((4, 4))
    >>> second = independent_initializer(shared, "wo")((4, 4))
    >>> bool((first != second).any())
    True
    """
    initializer = keras.initializers.get(identifier)
    config = initializer.get_config()
    seed = config.get("seed")
    if seed is not None and not isinstance(seed, int):
        return initializer
    if seed is not None:
        config["seed"] = (seed + zlib.crc32(weight_name.encode())) % 2**31
    return initializer.__class__.from_config(config)
