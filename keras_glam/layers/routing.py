"""GShard top-k routing: the router layer, the gating function and their typed outputs.

Shapes use these letters:

- `G`: routing groups, `S`: tokens per group, `M`: model dim,
- `E`: experts, `k`: choices per token (`top_k`), `C`: slots per expert and group.

The gating follows Google's GShard code as used by GLaM (lingvo
`gshard_layers.Top2GatingOnLogits`, praxis `gshard_utils.top2_gating_on_logits` and
`topk_gating_on_logits`, with `second_expert_policy="all"` and `legacy_mtf_behavior=True`):

1. `probs = softmax(x @ Wg)` over all `E` experts, in float32.
2. Greedy choices: `e_1 = argmax(probs)`, `e_j = argmax(probs` with `e_1..e_{j-1}` zeroed`)`;
   ties go to the lowest expert index.
3. For `top_k > 1` the chosen gates are divided by their sum (`+ 1e-9`) *before* capacity.
   For `top_k == 1` (Switch-style) the gate is the raw probability `probs[e_1]`, as in praxis
   `topk_gating_on_logits(k=1)`, so the router still receives a gradient through the output.
4. Slots: within each group, all first choices claim slots first, in token order, then all
   second choices in token order, and so on. A choice whose slot index reaches the capacity `C` is
   dropped: its gate becomes zero and the other gates are *not* renormalised.
5. Padding tokens take no slot, get zero gates and are left out of the auxiliary loss.
"""

import math
from typing import NamedTuple

import keras
from keras import ops

from keras_glam.layers.independent_initializer import independent_initializer

_GATE_EPSILON = 1e-9


class RoutingInstructions(NamedTuple):
    """Where each token's `k` choices go. Every field has shape `[G, S, k]`.

    Attributes:
        expert_index: int32, the chosen expert of each choice (also filled for padding tokens).
        expert_position: int32, the slot index of the choice in its expert's buffer for this group
            (the number of earlier claims on that expert in slot order). Meaningful only where
            `dispatched` is true; without a capacity it is the rank among all claims.
        dispatched: bool, true where the choice got a slot (a real token within capacity).
        combine_weights: float32, the gate that multiplies the expert's output: the normalised
            gate where dispatched, zero where dropped or padding.
    """

    expert_index: object
    expert_position: object
    dispatched: object
    combine_weights: object


class RoutingMetrics(NamedTuple):
    """Load statistics of one routing call, over real (non-padding) tokens of all groups.

    Attributes:
        routed_per_expert: float32 `[E]`, choices routed to each expert before capacity.
        dispatched_per_expert: float32 `[E]`, choices that got a slot (after capacity).
        dropped_fraction: float32 `[k]`, entry `j` is the fraction of real tokens whose
            `(j + 1)`-th choice was dropped for lack of capacity.
    """

    routed_per_expert: object
    dispatched_per_expert: object
    dropped_fraction: object


class RouterOutput(NamedTuple):
    """Everything a routing call produces.

    Attributes:
        instructions: `RoutingInstructions`, per token and choice.
        aux_loss: float32 scalar, the unweighted GShard load-balance loss (1 at perfect balance).
        router_probs: float32 `[G, S, E]`, the softmax over experts.
        metrics: `RoutingMetrics`.
    """

    instructions: RoutingInstructions
    aux_loss: object
    router_probs: object
    metrics: RoutingMetrics


def expert_capacity(group_size, num_experts, capacity_factor):
    """Slots per expert and routing group, GShard's rule.

    `int(group_size * capacity_factor / num_experts)` rounded up to a multiple of 4, as in lingvo
    and praxis. `capacity_factor` counts all `k` choices (GShard's convention: 2.0 gives room for
    every top-2 choice under perfect balance). Two bounds are added, neither of which GShard has:
    at least 4 slots (GShard can reach 0 for tiny groups, which drops every token), and at most
    `group_size` rounded up to 4 (an expert cannot receive more claims than the group has tokens,
    because a token's choices are distinct experts), so the bound never changes a routing result.

    Args:
        group_size: int, tokens per routing group `S`.
        num_experts: int, `E`.
        capacity_factor: float > 0.

    Returns:
        int, the capacity `C`.

    Example:

    >>> expert_capacity(group_size=4096, num_experts=64, capacity_factor=1.25)
    80
    >>> expert_capacity(group_size=100, num_experts=8, capacity_factor=2.0)
    28
    """
    if capacity_factor is None or capacity_factor <= 0:
        raise ValueError(
            f"`capacity_factor` must be a positive number, got {capacity_factor}. Use "
            "`capacity_factor=None` on the layer for routing without capacity."
        )
    capacity = int(group_size * capacity_factor / num_experts)
    capacity = min(max(capacity, 4), group_size)
    return _round_up(capacity, 4)


def top_k_gating(router_probs, top_k=2, capacity=None, padding_mask=None):
    """GShard greedy top-k gating on router probabilities (see the module docstring).

    Args:
        router_probs: float `[G, S, E]`, softmax outputs (computed in float32 by the caller).
        top_k: int, choices per token.
        capacity: int `C` (slots per expert and group), or None for routing without drops.
        padding_mask: optional `[G, S]`, zero (or False) marks padding tokens.

    Returns:
        A `RouterOutput`.

    Example:

    >>> import numpy as np
    >>> probs = np.array([[[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]]], "float32")
    >>> routing = top_k_gating(probs, top_k=2, capacity=1)
    >>> np.asarray(routing.instructions.expert_index)[0].tolist()
    [[0, 1], [0, 1]]
    >>> np.asarray(routing.instructions.dispatched)[0].tolist()
    [[True, True], [False, False]]
    """
    router_probs = ops.cast(router_probs, "float32")
    num_groups, group_size, num_experts = router_probs.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(
            f"`top_k` must be between 1 and the number of experts ({num_experts}), got {top_k}."
        )
    if padding_mask is None:
        is_real = ops.ones((num_groups, group_size), "float32")
    else:
        is_real = ops.cast(ops.not_equal(padding_mask, 0), "float32")

    expert_indices, one_hots, gates = [], [], []
    remaining_probs = router_probs
    for _ in range(top_k):
        expert_index = ops.argmax(remaining_probs, axis=-1)
        one_hot = ops.one_hot(expert_index, num_experts, dtype="float32")
        gates.append(ops.sum(remaining_probs * one_hot, axis=-1))
        remaining_probs = remaining_probs * (1.0 - one_hot)
        expert_indices.append(ops.cast(expert_index, "int32"))
        one_hots.append(one_hot * is_real[..., None])
    if top_k > 1:
        gate_sum = sum(gates) + _GATE_EPSILON
        gates = [gate / gate_sum for gate in gates]

    aux_loss = _load_balance_loss(router_probs, one_hots[0], is_real)

    # Slot order: every first choice in token order, then every second choice, and so on.
    claims_so_far = ops.zeros((num_groups, 1, num_experts), "float32")
    positions, dispatched, routed, kept = [], [], [], []
    for one_hot in one_hots:
        # Position of each claim: earlier claims on the same expert (exclusive cumsum).
        position_per_expert = ops.cumsum(one_hot, axis=1) - one_hot + claims_so_far
        position = ops.sum(position_per_expert * one_hot, axis=-1)
        is_dispatched = ops.sum(one_hot, axis=-1) > 0
        if capacity is not None:
            is_dispatched = ops.logical_and(is_dispatched, position < capacity)
        kept_one_hot = one_hot * ops.cast(is_dispatched, "float32")[..., None]
        # GShard offsets later choices by the claims *kept* so far; counting all claims would give
        # the same drop decisions, since a dropped claim means the expert is already full.
        claims_so_far = claims_so_far + ops.sum(kept_one_hot, axis=1, keepdims=True)
        positions.append(ops.cast(position, "int32"))
        dispatched.append(is_dispatched)
        routed.append(ops.sum(one_hot, axis=(0, 1)))
        kept.append(ops.sum(kept_one_hot, axis=(0, 1)))

    dispatched = ops.stack(dispatched, axis=-1)
    num_real = ops.maximum(ops.sum(is_real), 1.0)
    dropped_fraction = ops.sum(
        is_real[..., None] * (1.0 - ops.cast(dispatched, "float32")), axis=(0, 1)
    ) / num_real
    instructions = RoutingInstructions(
        expert_index=ops.stack(expert_indices, axis=-1),
        expert_position=ops.stack(positions, axis=-1),
        dispatched=dispatched,
        combine_weights=ops.stack(gates, axis=-1) * ops.cast(dispatched, "float32"),
    )
    metrics = RoutingMetrics(
        routed_per_expert=sum(routed),
        dispatched_per_expert=sum(kept),
        dropped_fraction=dropped_fraction,
    )
    return RouterOutput(instructions, aux_loss, router_probs, metrics)


def _load_balance_loss(router_probs, top1_one_hot, is_real):
    """GShard's `E^2 * mean_e(mean_s probs[s, e] * mean_s onehot(e_1)[s, e])`, mean over groups.

    Means run over the real tokens of each group: this is lingvo/praxis with
    `legacy_mtf_behavior=False`; their legacy default divides by all `S` tokens, so padding would
    shrink the loss. Groups without a real token are left out of the mean over groups.

    Args:
        router_probs: float32 `[G, S, E]`.
        top1_one_hot: float32 `[G, S, E]`, one-hot first choices, zero rows for padding.
        is_real: float32 `[G, S]`.

    Returns:
        float32 scalar.
    """
    num_experts = router_probs.shape[-1]
    real_per_group = ops.sum(is_real, axis=1, keepdims=True)
    denominator = ops.maximum(real_per_group, 1.0)
    mean_probs = ops.sum(router_probs * is_real[..., None], axis=1) / denominator
    top1_density = ops.sum(top1_one_hot, axis=1) / denominator
    per_group = num_experts * ops.sum(mean_probs * top1_density, axis=-1)
    has_real = ops.cast(real_per_group[:, 0] > 0, "float32")
    return ops.sum(per_group * has_real) / ops.maximum(ops.sum(has_real), 1.0)


def _round_up(value, multiple):
    return int(math.ceil(value / multiple) * multiple)


@keras.saving.register_keras_serializable(package="keras_glam")
class TopKRouter(keras.layers.Layer):
    """GShard top-k router: a float32 `[M, E]` gating kernel and `top_k_gating`.

    The kernel and the whole computation stay in float32 whatever the dtype policy of the
    surrounding model (GLaM routes in float32). `quantize()` leaves the router untouched on
    purpose: quantized router logits would change which experts tokens go to. The layer is not an
    `EinsumDense`, so `enable_lora` does not reach it either.

    Args:
        num_experts: int, `E`.
        top_k: int, choices per token (2 for GLaM).
        kernel_initializer: initializer of the `[M, E]` kernel. Default `"lecun_uniform"`:
            uniform with standard deviation `M^-1/2`, the gate initialisation of lingvo's
            `gshard_builder` and praxis' `internal_gshard_variance_scaling_fan_in_init`.
        **kwargs: base layer arguments (`name`, ...). The dtype is always float32.

    Call arguments:
        inputs: float `[G, S, M]`.
        padding_mask: optional `[G, S]`, zero marks padding.
        capacity: optional int, slots per expert and group (None: no drops).

    Returns:
        A `RouterOutput`.

    Example:

    >>> import numpy as np
    >>> router = TopKRouter(num_experts=4, top_k=2, name="router")
    >>> routing = router(np.ones((2, 8, 16), "float32"), capacity=4)
    >>> routing.instructions.combine_weights.shape
    (2, 8, 2)
    """

    def __init__(self, num_experts, top_k=2, kernel_initializer="lecun_uniform", **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        if num_experts < 1:
            raise ValueError(f"`num_experts` must be at least 1, got {num_experts}.")
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"`top_k` must be between 1 and `num_experts` ({num_experts}), got {top_k}."
            )
        self.num_experts = num_experts
        self.top_k = top_k
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_shape[-1], self.num_experts),
            initializer=independent_initializer(self.kernel_initializer, "router"),
            dtype="float32",
        )

    def call(self, inputs, padding_mask=None, capacity=None):
        logits = ops.matmul(ops.cast(inputs, "float32"), self.kernel)
        return top_k_gating(
            ops.softmax(logits, axis=-1),
            top_k=self.top_k,
            capacity=capacity,
            padding_mask=padding_mask,
        )

    def compute_output_spec(self, inputs, padding_mask=None, capacity=None):
        # The spec is traced through `call`, which reads the kernel: build it if needed.
        if not self.built:
            self.build(inputs.shape)
        return super().compute_output_spec(inputs, padding_mask=padding_mask, capacity=capacity)

    def quantize(self, mode=None, type_check=True, config=None):
        """Does nothing: the router stays float32 (see the class docstring)."""

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.update(
            {
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config
