"""Exact GLaM parameter counts from a config, without allocating a single weight."""

from keras_glam.models.architecture import elements_per_token
from keras_glam.models.architecture import resolve_config
from keras_glam.models.architecture import weight_shapes


def count_params(preset_or_config, vocabulary_size=None):
    """Return `(total, activated)` trainable parameter counts of a GLaM model.

    Sums `keras_glam.models.architecture.weight_shapes`, which gives, per layer, attention
    `4*M*N*Dh`, relative bias `N*32`, two norms `2*M`; dense FFN `3*M*H`; MoE router `M*E` and
    experts `2*E*M*H`; then the final norm `M` and the tied embedding `V*M` once (GLAM.md's
    counting). "Activated" counts `top_k` experts and the whole router per MoE layer. The
    embedding's rows are `vocabulary_size` rounded up to `pad_vocabulary_to_multiple_of`, as built.

    Args:
        preset_or_config: a preset name (`"glam_64b_64e"`) or a `GLaMBackbone` config dict.
        vocabulary_size: overrides the config's vocabulary size (the paper's table counts 32,000;
            its text says 256K).

    Example:
    ```python
    total, activated = keras_glam.count_params("glam_64b_64e")
    # (1159921410048, 94769520640)
    ```
    """
    _, config = resolve_config(preset_or_config)
    if vocabulary_size is not None:
        config["vocabulary_size"] = vocabulary_size
    trainable = [weight for weight in weight_shapes(config) if weight.trainable]
    total = sum(weight.size for weight in trainable)
    activated = sum(elements_per_token(weight, config) for weight in trainable)
    return total, activated
