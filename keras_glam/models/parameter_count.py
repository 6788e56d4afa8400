"""Exact GLaM parameter counts from a config, without allocating a single weight."""

from keras_glam.models.glam_presets import BACKBONE_PRESETS


def _resolve_config(preset_or_config):
    if isinstance(preset_or_config, dict):
        return preset_or_config
    if isinstance(preset_or_config, str):
        if preset_or_config not in BACKBONE_PRESETS:
            known = ", ".join(sorted(BACKBONE_PRESETS))
            raise ValueError(
                f"Unknown preset '{preset_or_config}'. Known presets: {known}. "
                "Or pass a GLaMBackbone config dict."
            )
        return BACKBONE_PRESETS[preset_or_config]["config"]
    raise TypeError(
        "count_params expects a preset name or a GLaMBackbone config dict, got "
        f"{type(preset_or_config).__name__}."
    )


def is_moe_layer(layer_index, num_experts, moe_layer_interval=2):
    """GLaM puts experts on layers 0, interval, 2*interval, ... (the first layer is MoE)."""
    return num_experts is not None and layer_index % moe_layer_interval == 0


def count_params(preset_or_config, vocabulary_size=None):
    """Return `(total, activated)` parameter counts of a GLaM model.

    Counts as GLAM.md does: per layer attention `4*M*N*Dh`, relative bias `N*32`, two norms `2*M`;
    dense FFN `3*M*H`; MoE router `M*E` and experts `2*E*M*H`; final norm `M`; the tied embedding
    `V*M` once. "Activated" counts `top_k` experts and the whole router per MoE layer.

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
    config = _resolve_config(preset_or_config)
    vocab = vocabulary_size if vocabulary_size is not None else config["vocabulary_size"]
    hidden = config["hidden_dim"]
    ffn = config["intermediate_dim"]
    heads = config["num_heads"]
    head_dim = config["head_dim"]
    experts = config.get("num_experts")
    top_k = config.get("top_k", 2)
    buckets = config.get("num_buckets", 32)
    interval = config.get("moe_layer_interval", 2)

    per_layer_shared = 4 * hidden * heads * head_dim + heads * buckets + 2 * hidden
    total = activated = vocab * hidden + hidden
    for layer_index in range(config["num_layers"]):
        total += per_layer_shared
        activated += per_layer_shared
        if is_moe_layer(layer_index, experts, interval):
            total += hidden * experts + 2 * experts * hidden * ffn
            activated += hidden * experts + 2 * min(top_k, experts) * hidden * ffn
        else:
            total += 3 * hidden * ffn
            activated += 3 * hidden * ffn
    return total, activated
