"""GLaM's training loss: token cross-entropy, the output z-loss, and routing statistics to log.

GLaM's loss (praxis `LanguageModel`/`GLaM` with Lingvo's `z_loss_weight`) is

```
loss = cross_entropy + z_loss_weight * mean(logsumexp(logits) ** 2) + sum of MoE aux losses
```

with both means taken over the real target tokens (`sample_weight > 0`, weighted by
`sample_weight`) and computed in float32. The MoE layers add their own `aux_loss_weight * aux`
terms with `add_loss`, so `model.losses` already carries the third term. The loss is the model's
own (`GLaMCausalLM.compute_loss`), so it lives with the models.
"""

from typing import NamedTuple

from keras import ops

# GLaM's weights of the two regularising terms: the output z-loss (`GLaMCausalLM.compile`) and
# the load-balance loss each MoE layer adds (`GLaMBackbone(aux_loss_weight=...)`).
Z_LOSS_WEIGHT = 1e-4
AUX_LOSS_WEIGHT = 0.01


class LanguageModelLosses(NamedTuple):
    """The two logit-based terms of GLaM's loss, float32 scalars.

    Attributes:
        cross_entropy: mean negative log-likelihood of the targets, in nats per token.
        z_loss: mean of `logsumexp(logits) ** 2` (unweighted: multiply by `z_loss_weight`).
    """

    cross_entropy: object
    z_loss: object


def weighted_token_mean(values, sample_weight=None):
    """`sum(values * w) / sum(w)`: the mean over real tokens (0 when no token has weight).

    Keras' default reduction (`"sum_over_batch_size"`) divides by the number of *positions*
    instead, so padding would shrink the loss; this is Keras' `"mean_with_sample_weight"`.

    Args:
        values: float `[B, L]` per-token values.
        sample_weight: `[B, L]` weights (0 for padding) or None for all ones.

    Returns:
        float32 scalar.
    """
    values = ops.cast(values, "float32")
    if sample_weight is None:
        return ops.mean(values)
    weights = ops.cast(sample_weight, "float32")
    return ops.divide_no_nan(ops.sum(values * weights), ops.sum(weights))


def language_model_losses(labels, logits, sample_weight=None):
    """GLaM's cross-entropy and output z-loss from one `logsumexp`, in float32.

    Args:
        labels: int `[B, L]` target token ids.
        logits: float `[B, L, V]` (cast to float32 first, as GLaM computes its losses).
        sample_weight: `[B, L]`, 0 where a position has no target (padding, document ends).

    Returns:
        `LanguageModelLosses(cross_entropy, z_loss)`.

    Example:

    >>> import numpy as np
    >>> logits = np.log(np.array([[[0.5, 0.25, 0.25]]], "float32"))
    >>> losses = language_model_losses(np.array([[0]]), logits)
    >>> round(float(losses.cross_entropy), 4), round(float(losses.z_loss), 4)
    (0.6931, 0.0)
    """
    logits = ops.cast(logits, "float32")
    log_normalizer = ops.logsumexp(logits, axis=-1)
    labels = ops.expand_dims(ops.cast(labels, "int32"), axis=-1)
    label_logits = ops.squeeze(ops.take_along_axis(logits, labels, axis=-1), axis=-1)
    return LanguageModelLosses(
        cross_entropy=weighted_token_mean(log_normalizer - label_logits, sample_weight),
        z_loss=weighted_token_mean(ops.square(log_normalizer), sample_weight),
    )


def routing_statistics(moe_layers):
    """Dropped-token fractions and expert-load imbalance of the last training call, averaged
    over MoE layers.

    Reads the non-trainable statistics every `MoEFeedForward` stores on a training call:
    `dropped_fraction` `[top_k]` and `expert_load` `[E]` (choices routed to each expert before
    capacity). The imbalance is the coefficient of variation `std / mean` of `expert_load`
    (0 for perfect balance, `sqrt(E - 1)` when one expert takes everything).

    Args:
        moe_layers: a non-empty list of `MoEFeedForward` layers (e.g. `backbone.moe_layers`).

    Returns:
        dict of float32 scalars: `dropped_top1`, `dropped_top2`, ... (one per choice) and
        `expert_load_cv`.
    """
    statistics = {}
    top_k = moe_layers[0].dropped_fraction.shape[0]
    dropped = ops.mean(ops.stack([layer.dropped_fraction for layer in moe_layers]), axis=0)
    for choice in range(top_k):
        statistics[f"dropped_top{choice + 1}"] = dropped[choice]
    load = ops.stack([layer.expert_load for layer in moe_layers])
    mean_load = ops.mean(load, axis=-1)
    load_cv = ops.divide_no_nan(ops.std(load, axis=-1), mean_load)
    statistics["expert_load_cv"] = ops.mean(load_cv)
    return statistics
