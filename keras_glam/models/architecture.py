"""The one description of GLaM's weights: the name, shape, dtype and role of each, from a config.

`count_params`, the memory check before a model is built, `flops_per_token` and the distribution
planner all read this list; nothing is allocated, so a 1.2T-parameter preset can be described on
a laptop. A test checks it against the variables of built models (`variable.path`, shape,
trainable, dtype).
"""

import math
import os
import typing

from keras_glam.models import presets

# What each weight does per token; `flops_per_token` counts 2 FLOPs per element of the matmul
# roles, `count_params` counts every trainable role.
EMBEDDING = "embedding"  # the input lookup, and the tied output logits `h @ E^T`
ATTENTION_PROJECTION = "attention_projection"
RELATIVE_BIAS = "relative_bias"
NORM = "norm"
DENSE_FFN = "dense_ffn"
ROUTER = "router"
EXPERTS = "experts"  # `[E, ...]`: a token uses `top_k` of the E slices
STATISTIC = "statistic"  # non-trainable routing statistics
MATMUL_ROLES = (EMBEDDING, ATTENTION_PROJECTION, DENSE_FFN, ROUTER, EXPERTS)

# GLaM's precision: float32 variables, bfloat16 computation (`GLaMBackbone(dtype=...)` or
# `keras.config.set_dtype_policy`). Attention, routing, logits and losses stay float32 whatever
# the policy, and the weights `WeightSpec.dtype` pins keep float32 storage.
MIXED_PRECISION_POLICY = "mixed_bfloat16"


class WeightSpec(typing.NamedTuple):
    """One weight of a `GLaMBackbone`, as the built model names and shapes it.

    Attributes:
        path: the variable's `path`, e.g. `"decoder_block_0/moe/expert_wi/kernel"`.
        shape: tuple of ints.
        trainable: bool.
        dtype: `"float32"` for weights pinned to float32 whatever the dtype policy (the router
            and the routing statistics), else None: the policy's variable dtype.
        role: what the weight does per token, one of this module's role constants.
    """

    path: str
    shape: tuple
    trainable: bool
    dtype: typing.Optional[str]
    role: str

    @property
    def size(self):
        return math.prod(self.shape)


def padded_vocabulary_size(vocabulary_size, multiple=1):
    """Embedding rows for `vocabulary_size` tokens, rounded up to a multiple of `multiple`.

    A mesh axis that splits the vocabulary must divide the number of rows; the extra rows are
    never looked up, and `GLaMCausalLM` masks their logits.

    Example:

    >>> padded_vocabulary_size(32000, 128), padded_vocabulary_size(97, 8)
    (32000, 104)
    """
    return -(-vocabulary_size // multiple) * multiple


def is_moe_layer(layer_index, num_experts, moe_layer_interval=2):
    """GLaM puts experts on layers 0, interval, 2*interval, ... (the first layer is MoE)."""
    return num_experts is not None and layer_index % moe_layer_interval == 0


def resolve_config(preset_or_config):
    """`(name, config)` of a builtin preset name, a local preset directory or a config dict.

    The name of a config dict is `"custom config"`; the config returned is a copy. Preset
    directories are read without building anything (`presets.local_backbone_config`).

    Example:

    >>> resolve_config("glam_tiny_8e")[1]["num_experts"]
    8
    """
    if isinstance(preset_or_config, dict):
        return "custom config", dict(preset_or_config)
    if isinstance(preset_or_config, (str, os.PathLike)):
        name = os.fspath(preset_or_config)
        return name, presets.local_backbone_config(name)
    raise TypeError(
        "Expected a preset name or directory, or a GLaMBackbone config dict, got "
        f"{type(preset_or_config).__name__}."
    )


def weight_shapes(preset_or_config):
    """Every weight a `GLaMBackbone` built from `preset_or_config` creates, in creation order.

    Paths are the variables' `path` (no model-name prefix), as `docs/architecture.md` lists
    them; the embedding has `vocabulary_size` rounded up to `pad_vocabulary_to_multiple_of` rows.

    Args:
        preset_or_config: a builtin preset name, a local preset directory or a `GLaMBackbone`
            config dict.

    Returns:
        A list of `WeightSpec`.

    Example:

    >>> [(w.path, w.shape) for w in weight_shapes("glam_tiny_8e")][:2]
    [('token_embedding/embeddings', (4096, 64)), ('decoder_block_0/attention_norm/scale', (64,))]
    """
    _, config = resolve_config(preset_or_config)
    hidden, ffn = config["hidden_dim"], config["intermediate_dim"]
    heads, head_dim = config["num_heads"], config["head_dim"]
    experts = config.get("num_experts")
    rows = padded_vocabulary_size(
        config["vocabulary_size"], config.get("pad_vocabulary_to_multiple_of", 1)
    )
    weights = [WeightSpec("token_embedding/embeddings", (rows, hidden), True, None, EMBEDDING)]
    for index in range(config["num_layers"]):
        block = f"decoder_block_{index}"
        weights.append(WeightSpec(f"{block}/attention_norm/scale", (hidden,), True, None, NORM))
        for name in ("query", "key", "value"):
            weights.append(
                WeightSpec(
                    f"{block}/attention/{name}/kernel", (hidden, heads, head_dim), True, None,
                    ATTENTION_PROJECTION,
                )
            )
        weights += [
            WeightSpec(
                f"{block}/attention/attention_output/kernel", (heads, head_dim, hidden), True,
                None, ATTENTION_PROJECTION,
            ),
            WeightSpec(
                f"{block}/attention/relative_bias/table",
                (heads, config.get("num_buckets", 32)), True, None, RELATIVE_BIAS,
            ),
            WeightSpec(f"{block}/feedforward_norm/scale", (hidden,), True, None, NORM),
        ]
        if is_moe_layer(index, experts, config.get("moe_layer_interval", 2)):
            weights += [
                WeightSpec(f"{block}/moe/router/kernel", (hidden, experts), True, "float32",
                           ROUTER),
                WeightSpec(f"{block}/moe/expert_wi/kernel", (experts, hidden, ffn), True, None,
                           EXPERTS),
                WeightSpec(f"{block}/moe/expert_wo/kernel", (experts, ffn, hidden), True, None,
                           EXPERTS),
                WeightSpec(f"{block}/moe/expert_load", (experts,), False, "float32", STATISTIC),
                WeightSpec(f"{block}/moe/dropped_fraction", (config.get("top_k", 2),), False,
                           "float32", STATISTIC),
            ]
        else:
            weights += [
                WeightSpec(f"{block}/ffn/{name}/kernel", shape, True, None, DENSE_FFN)
                for name, shape in (
                    ("ffn_gate", (hidden, ffn)),
                    ("ffn_linear", (hidden, ffn)),
                    ("ffn_output", (ffn, hidden)),
                )
            ]
    weights.append(WeightSpec("final_norm/scale", (hidden,), True, None, NORM))
    return weights


def elements_per_token(weight, config):
    """Elements of `weight` one token uses: `top_k` of the `E` expert slices, all of the rest.

    Non-trainable statistics count 0. The embedding counts whole: the output logits multiply by
    every row (the input lookup reads one).
    """
    if not weight.trainable:
        return 0
    if weight.role == EXPERTS:
        num_experts = weight.shape[0]
        return min(config.get("top_k", 2), num_experts) * (weight.size // num_experts)
    return weight.size
