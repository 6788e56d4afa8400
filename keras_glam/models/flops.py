"""Model FLOPs per token of a GLaM config, from the one description of its weights.

Conventions (`docs/compute.md` compares them with the paper's):

- Matmuls only, 2 FLOPs per multiply-add. Norms, softmax, activations, the relative bias and the
  input embedding lookup are left out (together well under 1% of the matmuls at GLaM's sizes).
- A MoE layer counts its router and the `top_k` experts each token uses; capacity slots left
  empty, dropped tokens and the one-hot dispatch einsums get no credit (MaxText's convention).
- Attention scores (`q.k` and `p.v`) depend on the sequence length. `causal=True` counts the
  keys a causal query sees, `(L + 1) / 2` on average per token; `causal=False` counts all `L`
  (PaLM's `6N + 12 * layers * heads * head_dim * L` training convention). GLaM's extra zero
  logit has a zero value: no FLOPs.
- Output logits: `h @ E^T` over every embedding row (padded rows included, as computed).
- Training = 3 x forward (the backward pass does two matmuls per forward one), so training
  FLOPs per token are close to `6 * activated_params`, the common approximation, plus the
  attention scores.
"""

from keras_glam.models.architecture import ATTENTION_PROJECTION
from keras_glam.models.architecture import DENSE_FFN
from keras_glam.models.architecture import EMBEDDING
from keras_glam.models.architecture import EXPERTS
from keras_glam.models.architecture import ROUTER
from keras_glam.models.architecture import elements_per_token
from keras_glam.models.architecture import resolve_config
from keras_glam.models.architecture import weight_shapes

TRAINING_FLOPS_PER_FORWARD_FLOP = 3

# GPT-3 175B (Brown et al. 2020, Table 2.1) in GLaM's config keys, to compare with the paper's
# 350 GFLOPs per token: count it with `dense_ffn="mlp"` (a two-matrix GELU FFN) and
# `sequence_length=2048`. GPT-3's locally banded sparse layers and its biases are not modelled.
GPT3_175B_CONFIG = {
    "vocabulary_size": 50257,
    "num_layers": 96,
    "hidden_dim": 12288,
    "intermediate_dim": 4 * 12288,
    "num_heads": 96,
    "head_dim": 128,
    "num_experts": None,
}

_PART_OF_ROLE = {
    ATTENTION_PROJECTION: "attention_projections",
    DENSE_FFN: "dense_ffn",
    ROUTER: "routed_experts",
    EXPERTS: "routed_experts",
    EMBEDDING: "output_logits",
}
_DENSE_FFN_KINDS = ("geglu", "mlp")


def flops_per_token(
    preset_or_config, sequence_length=1024, breakdown=False, causal=True, dense_ffn="geglu"
):
    """Forward-pass model FLOPs per token of a GLaM model (matmuls, 2 per multiply-add).

    Args:
        preset_or_config: a preset name (`"glam_64b_64e"`) or a `GLaMBackbone` config dict.
        sequence_length: int, tokens per row; only the attention scores depend on it.
        breakdown: return a dict by part instead of the total.
        causal: count the keys a causal query sees (`(L + 1) / 2` on average) rather than
            all `L` of them.
        dense_ffn: `"geglu"` (GLaM's dense layers: three `M x H` matrices) or `"mlp"` (two,
            as in GPT-3; `GLaMBackbone` does not build it: for comparisons such as
            `GPT3_175B_CONFIG`).

    Returns:
        int, FLOPs per token; with `breakdown=True` a dict with the keys
        `attention_projections`, `attention_scores`, `dense_ffn`, `routed_experts` (router
        plus the `top_k` experts) and `output_logits`, which sum to the total. Training
        costs `TRAINING_FLOPS_PER_FORWARD_FLOP` (3) times as much: `training_flops_per_token`.

    Example:

    >>> flops_per_token("glam_tiny_dense", sequence_length=32)
    696576
    >>> flops_per_token("glam_64b_64e", breakdown=True)["routed_experts"]
    68753031168
    """
    _, config = resolve_config(preset_or_config)
    if not isinstance(sequence_length, int) or sequence_length < 1:
        raise ValueError(f"`sequence_length` must be a positive int, got {sequence_length!r}.")
    if dense_ffn not in _DENSE_FFN_KINDS:
        raise ValueError(
            f"`dense_ffn` must be one of {', '.join(_DENSE_FFN_KINDS)}, got {dense_ffn!r}."
        )
    parts = dict.fromkeys(
        ("attention_projections", "attention_scores", "dense_ffn", "routed_experts",
         "output_logits"),
        0,
    )
    for weight in weight_shapes(config):
        part = _PART_OF_ROLE.get(weight.role)
        if part is None or (dense_ffn == "mlp" and weight.path.endswith("/ffn_gate/kernel")):
            continue
        parts[part] += 2 * elements_per_token(weight, config)
    # q.k and p.v: 2 FLOPs per multiply-add, 2 products, N * Dh wide, per key seen.
    width = config["num_heads"] * config["head_dim"]
    if causal:
        # Query i sees keys 0..i: the L (L + 1) / 2 pairs of a row, per token.
        per_layer = 2 * width * (sequence_length + 1)
    else:
        per_layer = 4 * width * sequence_length
    parts["attention_scores"] = config["num_layers"] * per_layer
    return parts if breakdown else sum(parts.values())


def training_flops_per_token(preset_or_config, sequence_length=1024, **kwargs):
    """`TRAINING_FLOPS_PER_FORWARD_FLOP` (3) times `flops_per_token`: forward plus backward.

    Keyword arguments are those of `flops_per_token` (`causal`, `dense_ffn`).

    Example:

    >>> training_flops_per_token("glam_tiny_dense", sequence_length=32)
    2089728
    """
    return TRAINING_FLOPS_PER_FORWARD_FLOP * flops_per_token(
        preset_or_config, sequence_length, **kwargs
    )
