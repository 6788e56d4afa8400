"""Checks of a `LayoutMap` against a model: every weight must have a layout.

The layout rules and the map itself are the model's (`keras_glam.models.layout_rules`,
`GLaMBackbone.get_layout_map`).
"""

import re


def unmatched_weights(model, layout_map):
    """Paths of `model`'s weights that no key of `layout_map` matches.

    `LayoutMap` silently replicates a weight no key matches; GLaM's map is meant to name every
    weight (sharded, or deliberately replicated via `REPLICATED_WEIGHTS`), so a non-empty result
    means a weight was renamed or added without a layout.

    Args:
        model: a built Keras model or layer.
        layout_map: a `keras.distribution.LayoutMap`.

    Returns:
        list of str, the unmatched `variable.path`s in model order.
    """
    return [
        variable.path
        for variable in model.weights
        if not any(re.fullmatch(key, variable.path) for key in layout_map)
    ]
