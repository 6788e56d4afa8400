"""GLaM's mixture-of-experts feed-forward layer: GShard top-k routing, capacity, dispatch."""

import math
from typing import NamedTuple

import keras
from keras import ops

from keras_glam.layers.expert_einsum_dense import ExpertEinsumDense
from keras_glam.layers.expert_loop import expert_loop_ffn
from keras_glam.layers.independent_initializer import independent_initializer
from keras_glam.layers.routing import TopKRouter
from keras_glam.layers.routing import expert_capacity

_DISPATCH_MODES = ("auto", "einsum", "sort", "sort_loop")
_MAX_DROPLESS_BLOCK = 128
# Decoding steps take the dropless capacity buffers: 1 to 4 choices per expert on average,
# and at most this many rows (`E * T`) in the largest buffer.
_MAX_DROPLESS_CHOICES_PER_EXPERT = 4
_MAX_DROPLESS_BUFFER_ROWS = 4096


@keras.saving.register_keras_serializable(package="keras_glam")
class MoEFeedForward(keras.layers.Layer):
    """Top-k mixture of two-matrix expert FFNs, `y = sum_j g_j * act(x Wi[e_j]) Wo[e_j]`.

    Tokens are flattened to `T = B * L` and split into `G` contiguous routing groups of
    `S = T / G` tokens. A float32 GShard router (`TopKRouter`) picks `top_k` experts per token;
    during training every expert takes at most `C = expert_capacity(S, E, capacity_factor)` tokens
    per group, later claims are dropped (their gate is zeroed, the other gate is not renormalised,
    a token dropped by all its choices outputs zero: in GLaM only the residual carries it).
    Padding tokens are not routed and output zero.

    Capacity-based computation (training, or evaluation with `eval_capacity_factor`) gathers the
    tokens into per-expert buffers, runs every expert on its buffer and combines the outputs
    weighted by the gates. The first two modes produce the same `expert_inputs` `[E, G, C, M]`
    and run the experts with batched matmuls; the third packs them differently and loops:

    - `"einsum"`: GShard's one-hot dispatch and combine tensors `[G, S, E, C]`
      (`einsum("gsec,gsm->egcm")`, `einsum("gsec,egcm->gsm")`). Extra FLOPs grow with `S`, so
      keep groups small; it partitions cleanly under GSPMD.
    - `"sort"`: integer slot maps and row gathers, `O(T * k * M)` data movement and no `S * C`
      term. Its backward pass is written with gathers too (a custom gradient), never a
      scatter-add.
    - `"sort_loop"`: the gathers of `"sort"` into `[E, G * C, M]` buffers holding each expert's
      tokens first, then a loop over experts that multiplies only the filled rows (rounded up to
      16; `expert_loop.expert_loop_ffn`), forward and backward: no FLOPs on empty slots. Fastest on
      CPU; JAX only, one device (it does not partition), float experts (quantized experts use
      the batched matmuls of `"sort"`).
    - `"auto"`: `"einsum"` on TPU or under a `keras.distribution`, `"sort_loop"` on CPU (JAX),
      `"sort"` otherwise.

    Evaluation and decoding (`training` falsy) with `eval_capacity_factor=None` drop no token.
    Routing without capacity uses a single group (groups only matter for capacity), and the
    experts run in one of two ways, with the same results:

    - A decoding step of many rows, 1 to 4 choices per expert on average (`E <= T * k <= 4 * E`;
      the scan below would run blocks of one or two rows), with `E * T <= 4096` and float
      experts: capacity buffers `[E, C, M]` with `C` the busiest expert's claims rounded
      up to a power of two (at most `T`, since a token's choices are distinct experts), so
      nothing drops. The experts' batched matmuls read each expert's weights once, where the
      scan reads an expert per block. The compiled program switches between the
      `ceil(log2 T) + 1` buffer sizes at run time. The matmuls cover `E * C` rows for `T * k`
      choices: typically 4x with balanced routing at 16 rows and 16 experts, up to `E / k`
      times when one expert takes nearly every token (`eval_capacity_factor` bounds that).
    - Otherwise the `T * k` choices are laid out sorted by expert, each expert's run padded to a
      multiple of a block size `b` (a static bound of `T * k + E * (b - 1)` rows), and a scan
      over the blocks multiplies each block by its expert's weights, skipping the empty blocks
      at the end (padding tokens' share of the bound, and the rounding). `b` is 1 when `T * k` is
      small (a decoding step of a few rows: only the chosen experts' matrices are read) and
      grows up to 128 while the padding stays within half the rows.

    Both compute each expert as its layer does, with LoRA; quantized experts (every mode they
    accept) take the block scan, through `ExpertEinsumDense.expert_matmul`, which dequantizes
    int4 and float8 kernels once per call and gives float8 the LoRA term Keras' call refuses.

    The auxiliary load-balance loss `aux_loss_weight * aux` is added with `add_loss` on every call
    (see `routing.top_k_gating`). Training calls also store routing statistics in two
    non-trainable float32 variables a training loop can log: `expert_load` `[E]` (choices routed to
    each expert before capacity, in the last training call) and `dropped_fraction` `[top_k]`
    (fraction of real tokens whose `j + 1`-th choice was dropped). Direct callers get the full
    `RouterOutput` with `return_routing=True`.

    Weights: `router/kernel` `[M, E]` (float32 always; `quantize()` and `enable_lora()` leave it
    alone), `expert_wi/kernel` `[E, M, H]` and `expert_wo/kernel` `[E, H, M]` (two
    `ExpertEinsumDense` layers, so `enable_lora(rank)` and `quantize()` apply to the experts, in
    every dispatch mode and without capacity: modes `"int8"`, `"int4"` and `"float8"`; `"gptq"`
    and `"awq"` are refused when `quantize()` reaches an expert layer). Experts compute in the
    layer's compute dtype; routing runs in float32.

    Args:
        num_experts: int, `E`.
        intermediate_dim: int, hidden size `H` of each expert.
        top_k: int, experts per token (GLaM: 2).
        capacity_factor: float or None. Training capacity in GShard's convention (counts all `k`
            choices; 2.0 fits every choice under perfect balance). None: train without drops.
        eval_capacity_factor: float or None. Capacity used when `training` is falsy; None (the
            default) routes without capacity and drops nothing.
        num_groups: int or None, routing groups `G`. None: one per batch shard, the number of
            devices the active `keras.distribution` splits the batch over (`data x expert` under
            `keras_glam.distribution.expert_parallel`; 1 without one). `B * L` must divide by it.
        dispatch: `"auto"`, `"einsum"`, `"sort"` or `"sort_loop"`, see above.
        activation: expert activation (GLaM: `"relu"`).
        aux_loss_weight: float, weight of the load-balance loss (GLaM: 0.01 per MoE layer).
        kernel_initializer: initializer of the expert kernels. Default `"lecun_uniform"`: uniform
            with standard deviation `fan_in^-1/2` (`M^-1/2` for `Wi`, `H^-1/2` for `Wo`), as
            lingvo's `gshard_builder` and praxis' `TransformerFeedForwardMoe`. `Wi` and `Wo` are
            drawn independently, each from its own copy (`independent_initializer`: a fixed
            integer seed is shifted by a number derived from each weight's name, so `Wi`, `Wo`
            and the router differ even when given one seeded initializer).
        router_initializer: initializer of the router kernel, default as above (`M^-1/2`).
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: float `[B, L, M]` (any number of leading token axes works).
        padding_mask: optional `[B, L]`; zero marks padding, any other value a real token.
        training: bool; selects `capacity_factor` or `eval_capacity_factor`.
        return_routing: bool; if True return `(outputs, RouterOutput)`. For direct calls only.

    Returns:
        `[B, L, M]` in the compute dtype (and the `RouterOutput` if `return_routing`).

    Example:

    >>> import numpy as np
    >>> moe = MoEFeedForward(num_experts=4, intermediate_dim=32, name="moe")
    >>> x = np.random.normal(size=(2, 8, 16)).astype("float32")
    >>> y = moe(x, training=True)
    >>> y.shape, len(moe.losses)
    ((2, 8, 16), 1)
    """

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        top_k=2,
        capacity_factor=2.0,
        eval_capacity_factor=None,
        num_groups=None,
        dispatch="auto",
        activation="relu",
        aux_loss_weight=0.01,
        kernel_initializer="lecun_uniform",
        router_initializer="lecun_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if dispatch not in _DISPATCH_MODES:
            raise ValueError(f"`dispatch` must be one of {_DISPATCH_MODES}, got {dispatch!r}.")
        for arg_name, factor in (
            ("capacity_factor", capacity_factor),
            ("eval_capacity_factor", eval_capacity_factor),
        ):
            if factor is not None and factor <= 0:
                raise ValueError(
                    f"`{arg_name}` must be positive, or None for routing without capacity; "
                    f"got {factor}."
                )
        if num_groups is not None and num_groups < 1:
            raise ValueError(f"`num_groups` must be a positive int or None, got {num_groups}.")
        self.num_experts = num_experts
        self.intermediate_dim = intermediate_dim
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.num_groups = num_groups
        self.dispatch = dispatch
        self.activation = keras.activations.get(activation)
        self.aux_loss_weight = aux_loss_weight
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.router_initializer = keras.initializers.get(router_initializer)
        self.router = TopKRouter(
            num_experts, top_k, kernel_initializer=self.router_initializer, name="router"
        )

    def build(self, input_shape):
        model_dim = input_shape[-1]
        self.router.build((None, None, model_dim))
        self.expert_wi = ExpertEinsumDense(
            "egcm,emh->egch",
            output_shape=(None, None, self.intermediate_dim),
            kernel_initializer=independent_initializer(self.kernel_initializer, "expert_wi"),
            dtype=self.dtype_policy,
            name="expert_wi",
        )
        self.expert_wi.build((self.num_experts, None, None, model_dim))
        self.expert_wo = ExpertEinsumDense(
            "egch,ehm->egcm",
            output_shape=(None, None, model_dim),
            kernel_initializer=independent_initializer(self.kernel_initializer, "expert_wo"),
            dtype=self.dtype_policy,
            name="expert_wo",
        )
        self.expert_wo.build((self.num_experts, None, None, self.intermediate_dim))
        self.expert_load = self.add_weight(
            name="expert_load",
            shape=(self.num_experts,),
            initializer="zeros",
            dtype="float32",
            trainable=False,
            autocast=False,
        )
        self.dropped_fraction = self.add_weight(
            name="dropped_fraction",
            shape=(self.top_k,),
            initializer="zeros",
            dtype="float32",
            trainable=False,
            autocast=False,
        )

    def _dispatch_mode(self):
        """Resolve `"auto"` at call time: the distribution may be set after the model is built.

        GShard's einsums on TPU and whenever a distribution is active (the gather of `"sort"`
        indexes tokens globally, so under expert parallelism XLA would gather every token onto
        every device instead of exchanging them all-to-all); the expert loop on CPU, where
        batched matmuls are slow and skipping empty slots pays; `"sort"` otherwise (GPU).
        """
        if self.dispatch != "auto":
            return self.dispatch
        platform = keras.distribution.list_devices()[0].lower()
        if platform.startswith("tpu") or keras.distribution.distribution() is not None:
            return "einsum"
        if platform.startswith("cpu") and keras.config.backend() == "jax":
            return "sort_loop"
        return "sort"

    def call(self, inputs, padding_mask=None, training=None, return_routing=False):
        model_dim = inputs.shape[-1]
        num_tokens = math.prod(inputs.shape[:-1])
        # `stateless_call` skips the input autocasting of `__call__`.
        tokens = ops.reshape(ops.cast(inputs, self.compute_dtype), (num_tokens, model_dim))
        is_real = None
        if padding_mask is not None:
            is_real = ops.reshape(ops.not_equal(padding_mask, 0), (num_tokens,))
        capacity_factor = self.capacity_factor if training else self.eval_capacity_factor
        if capacity_factor is None:
            outputs, routing = self._dropless_forward(tokens, is_real)
        else:
            outputs, routing = self._capacity_forward(tokens, is_real, capacity_factor)
        if training:
            self.expert_load.assign(routing.metrics.routed_per_expert)
            self.dropped_fraction.assign(routing.metrics.dropped_fraction)
        self.add_loss(self.aux_loss_weight * routing.aux_loss)
        outputs = ops.reshape(outputs, inputs.shape)
        if return_routing:
            return outputs, routing
        return outputs

    def _capacity_forward(self, tokens, is_real, capacity_factor):
        """Routing with capacity, then `"einsum"` or `"sort"` dispatch. Tokens `[T, M]`."""
        num_tokens, model_dim = tokens.shape
        num_groups = self._resolve_num_groups(num_tokens)
        group_size = num_tokens // num_groups
        capacity = expert_capacity(group_size, self.num_experts, capacity_factor)
        grouped = ops.reshape(tokens, (num_groups, group_size, model_dim))
        group_mask = None if is_real is None else ops.reshape(is_real, (num_groups, group_size))
        routing = self.router(grouped, padding_mask=group_mask, capacity=capacity)
        instructions = routing.instructions
        mode = self._dispatch_mode()
        if mode == "einsum":
            dispatch_mask, combine_tensor = _one_hot_dispatch_tensors(
                instructions, self.num_experts, capacity, self.compute_dtype
            )
            expert_inputs = ops.einsum("gsec,gsm->egcm", dispatch_mask, grouped)
            expert_outputs = self._constrain_expert_outputs(
                self._run_experts(self._constrain_expert_inputs(expert_inputs))
            )
            outputs = ops.einsum("gsec,egcm->gsm", combine_tensor, expert_outputs)
            return ops.reshape(outputs, (num_tokens, model_dim)), routing
        if mode == "sort_loop" and self._experts_are_float():
            slots = _packed_slot_map(instructions, self.num_experts, capacity)
            expert_inputs = ops.reshape(
                _gather_into_slots(tokens, slots),
                (self.num_experts, num_groups * capacity, model_dim),
            )
            expert_outputs = expert_loop_ffn(
                expert_inputs,
                ops.cast(self.expert_wi.kernel, self.compute_dtype),
                ops.cast(self.expert_wo.kernel, self.compute_dtype),
                ops.cast(routing.metrics.dispatched_per_expert, "int32"),
                self.activation,
            )
        else:
            slots = _capacity_slot_map(instructions, self.num_experts, capacity)
            expert_inputs = ops.reshape(
                _gather_into_slots(tokens, slots),
                (self.num_experts, num_groups, capacity, model_dim),
            )
            expert_outputs = self._constrain_expert_outputs(
                self._run_experts(self._constrain_expert_inputs(expert_inputs))
            )
        outputs = _combine_from_slots(
            ops.reshape(expert_outputs, (-1, model_dim)),
            slots,
            _flat_choices(instructions.combine_weights),
        )
        return ops.reshape(outputs, (num_tokens, model_dim)), routing

    def _constrain_expert_inputs(self, expert_inputs):
        """Hook on the dispatched activations `[E, G, C, M]`, the tensor expert parallelism shards.

        Constrains them to the active distribution's layouts for
        `f"{self.path}/expert_inputs_by_group"`, then `f"{self.path}/expert_inputs"` (those
        present): the `LayoutMap` of `keras_glam.distribution` puts the groups on the devices
        that hold their tokens, then each expert's slots on the expert's device. The dispatch
        einsum then runs where the tokens are and XLA moves the slots by all-to-all; sharding
        the expert kernels alone lets XLA gather tokens or kernels instead. Without such
        layouts the input is returned unchanged.
        """
        return self._relayout(expert_inputs, ("expert_inputs_by_group", "expert_inputs"))

    def _constrain_expert_outputs(self, expert_outputs):
        """The reverse of `_constrain_expert_inputs` for the expert outputs `[E, G, C, M]`.

        Layouts `f"{self.path}/expert_outputs"`, then `f"{self.path}/expert_outputs_by_group"`:
        the outputs return to their groups' devices by all-to-all, and the combine and its
        gradient run there.
        """
        return self._relayout(expert_outputs, ("expert_outputs", "expert_outputs_by_group"))

    def _relayout(self, tensor, layout_names):
        distribution = keras.distribution.distribution()
        if distribution is None:
            return tensor
        for layout_name in layout_names:
            layout = distribution.get_tensor_layout(f"{self.path}/{layout_name}")
            if layout is not None:
                tensor = keras.distribution.distribute_tensor(tensor, layout)
        return tensor

    def _experts_are_float(self):
        return self.expert_wi.quantization_mode is None and self.expert_wo.quantization_mode is None

    def _run_experts(self, expert_inputs):
        """`[E, G, C, M]` -> `[E, G, C, M]`, each expert on its own buffer."""
        return self.expert_wo(self.activation(self.expert_wi(expert_inputs)))

    def _dropless_forward(self, tokens, is_real):
        """Routing without capacity (one group), then capacity buffers sized to the busiest
        expert or the block-sorted expert scan (see the class docstring). `[T, M]`."""
        num_tokens = tokens.shape[0]
        routing = self.router(
            tokens[None],
            padding_mask=None if is_real is None else is_real[None],
            capacity=None,
        )
        if self._dropless_path(num_tokens) == "buffers":
            return self._dropless_buffers(tokens, routing), routing
        return self._dropless_blocks(tokens, routing), routing

    def _dropless_path(self, num_tokens):
        """`"buffers"` for 1 to 4 choices per expert on average (a decoding step of many rows),
        `E * T <= 4096` and float experts; else `"blocks"`."""
        num_choices = num_tokens * self.top_k
        if (
            self.num_experts <= num_choices <= _MAX_DROPLESS_CHOICES_PER_EXPERT * self.num_experts
            and self.num_experts * num_tokens <= _MAX_DROPLESS_BUFFER_ROWS
            and self._experts_are_float()
        ):
            return "buffers"
        return "blocks"

    def _dropless_buffers(self, tokens, routing):
        """Every expert on the first `C` rows of its `T`-row buffer, `C` the smallest size in
        `_buffer_capacities` that holds the busiest expert's claims. `[T, M]`."""
        num_tokens, model_dim = tokens.shape
        num_experts = self.num_experts
        slots = _capacity_slot_map(routing.instructions, num_experts, num_tokens)
        buffers = ops.reshape(
            _gather_into_slots(tokens, slots), (num_experts, num_tokens, model_dim)
        )
        capacities = _buffer_capacities(num_tokens)
        busiest = ops.max(routing.metrics.dispatched_per_expert)
        smaller = ops.convert_to_tensor(capacities[:-1], dtype=busiest.dtype)
        branch_index = ops.sum(ops.cast(smaller < busiest, "int32"))

        def with_capacity(capacity):
            def run(buffers):
                expert_inputs = ops.reshape(
                    buffers[:, :capacity], (num_experts, 1, capacity, model_dim)
                )
                expert_outputs = ops.reshape(
                    self._run_experts(expert_inputs), (num_experts, capacity, model_dim)
                )
                return ops.pad(expert_outputs, [(0, 0), (0, num_tokens - capacity), (0, 0)])

            return run

        buffer_outputs = ops.switch(
            branch_index, [with_capacity(capacity) for capacity in capacities], buffers
        )
        return _combine_from_slots(
            ops.reshape(buffer_outputs, (-1, model_dim)),
            slots,
            _flat_choices(routing.instructions.combine_weights),
        )

    def _dropless_blocks(self, tokens, routing):
        """The block-sorted expert scan. `[T, M]`."""
        num_tokens, model_dim = tokens.shape
        num_choices = num_tokens * self.top_k
        block_size = _dropless_block_size(num_choices, self.num_experts)
        slots, block_expert, block_is_filled = _block_slot_map(
            routing.instructions, routing.metrics.dispatched_per_expert, block_size
        )
        rows = ops.reshape(_gather_into_slots(tokens, slots), (-1, block_size, model_dim))
        wi_matmul = self.expert_wi.expert_matmul()
        wo_matmul = self.expert_wo.expert_matmul()

        def expert_block(carry, block):
            block_rows, expert, is_filled = block
            # Blocks past the last expert's run (the bound counts padding tokens and every
            # expert's rounding) are skipped.
            return carry, ops.cond(
                is_filled,
                lambda: wo_matmul(self.activation(wi_matmul(block_rows, expert)), expert),
                lambda: ops.zeros_like(block_rows),
            )

        _, row_outputs = ops.scan(expert_block, 0, (rows, block_expert, block_is_filled))
        return _combine_from_slots(
            ops.reshape(row_outputs, (-1, model_dim)),
            slots,
            _flat_choices(routing.instructions.combine_weights),
        )

    def _resolve_num_groups(self, num_tokens):
        num_groups = self.num_groups
        if num_groups is None:
            num_groups = _batch_devices_of_distribution()
        if num_tokens % num_groups:
            raise ValueError(
                f"MoEFeedForward '{self.name}': the {num_tokens} tokens (batch x length) cannot "
                f"be split into num_groups={num_groups} routing groups of equal size"
                + (
                    " (num_groups=None took the devices the distribution splits the batch over)"
                    if self.num_groups is None
                    else ""
                )
                + ". Pass a `num_groups` that divides batch x length, or change the batch size."
            )
        return num_groups

    def compute_output_spec(self, inputs, padding_mask=None, training=None, return_routing=False):
        if return_routing:
            raise ValueError(
                "`return_routing=True` is for direct calls on tensors, not for building "
                "functional models."
            )
        return keras.KerasTensor(inputs.shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "intermediate_dim": self.intermediate_dim,
                "top_k": self.top_k,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "num_groups": self.num_groups,
                "dispatch": self.dispatch,
                "activation": keras.activations.serialize(self.activation),
                "aux_loss_weight": self.aux_loss_weight,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "router_initializer": keras.initializers.serialize(self.router_initializer),
            }
        )
        return config


class _SlotMap(NamedTuple):
    """Two inverse integer maps between choices and buffer slots.

    `slot_of_choice` `[T, k]`: the slot of each choice, `num_slots` where it has none.
    `choice_of_slot` `[P]`: the choice `token * k + j` in each slot, `T * k` where empty.
    """

    slot_of_choice: object
    choice_of_slot: object


def _flat_choices(per_group):
    """`[G, S, k]` -> `[G * S, k]`: choice `j` of global token `g * S + s`."""
    return ops.reshape(per_group, (-1, per_group.shape[-1]))


def _capacity_slot_map(instructions, num_experts, capacity):
    """Slots laid out as `[E, G, C]`: slot `(e * G + g) * C + position`."""
    num_groups = instructions.expert_index.shape[0]
    group_index = ops.arange(num_groups, dtype="int32")[:, None, None]
    slot = (instructions.expert_index * num_groups + group_index) * capacity
    return _dispatched_slot_map(instructions, slot, num_experts * num_groups * capacity)


def _packed_slot_map(instructions, num_experts, capacity):
    """Slots laid out as `[E, G * C]` with each expert's dispatched choices first.

    Expert `e`'s rows hold group 0's claims in slot order, then group 1's, ...: slot
    `e * G * C + (claims kept on e by earlier groups) + position`, so its first
    `dispatched_per_expert[e]` rows are exactly the filled ones.
    """
    num_groups, group_size, top_k = instructions.expert_index.shape
    slot = instructions.expert_index * (num_groups * capacity)
    if num_groups > 1:
        kept = ops.one_hot(instructions.expert_index, num_experts, dtype="int32")
        kept = kept * ops.cast(instructions.dispatched, "int32")[..., None]
        kept_per_group = ops.sum(kept, axis=(1, 2))
        kept_by_earlier_groups = ops.cumsum(kept_per_group, axis=0) - kept_per_group
        offset = ops.take_along_axis(
            kept_by_earlier_groups,
            ops.reshape(instructions.expert_index, (num_groups, group_size * top_k)),
            axis=1,
        )
        slot = slot + ops.reshape(offset, instructions.expert_index.shape)
    return _dispatched_slot_map(instructions, slot, num_experts * num_groups * capacity)


def _dispatched_slot_map(instructions, slot_of_first_position, num_slots):
    """The `_SlotMap` of choices at `slot_of_first_position + expert_position`; dropped choices
    and padding get no slot."""
    slot = slot_of_first_position + instructions.expert_position
    slot = ops.where(instructions.dispatched, slot, num_slots)
    return _invert_slots(_flat_choices(slot), num_slots)


def _block_slot_map(instructions, dispatched_per_expert, block_size):
    """Rows sorted by expert, each expert's run padded to a multiple of `block_size`.

    Args:
        instructions: `RoutingInstructions` of one group (`[1, T, k]`), routed without capacity.
        dispatched_per_expert: float `[E]`, choices per expert.
        block_size: int `b`.

    Returns:
        The `_SlotMap` over `R = roundup(T * k + E * (b - 1), b)` rows, the int32 expert of
        each of the `R / b` blocks, and whether each block starts before the last expert's run
        ends (the later blocks are empty).
    """
    num_experts = dispatched_per_expert.shape[0]
    num_choices = math.prod(instructions.expert_index.shape)
    num_rows = -(-(num_choices + num_experts * (block_size - 1)) // block_size) * block_size
    counts = ops.cast(dispatched_per_expert, "int32")
    padded_counts = (counts + block_size - 1) // block_size * block_size
    padded_end = ops.cumsum(padded_counts)
    padded_start = padded_end - padded_counts
    slots = _dispatched_slot_map(
        instructions, ops.take(padded_start, instructions.expert_index), num_rows
    )
    block_start = ops.arange(0, num_rows, block_size, dtype="int32")
    block_expert = ops.sum(ops.cast(padded_end[None, :] <= block_start[:, None], "int32"), axis=1)
    # Blocks past the last expert's run hold only empty rows; any valid expert will do.
    block_expert = ops.minimum(block_expert, num_experts - 1)
    return slots, block_expert, block_start < padded_end[-1]


def _invert_slots(slot_of_choice, num_slots):
    num_choices = math.prod(slot_of_choice.shape)
    choice_of_slot = ops.scatter_update(
        ops.full((num_slots + 1,), num_choices, dtype="int32"),
        ops.reshape(slot_of_choice, (-1, 1)),
        ops.arange(num_choices, dtype="int32"),
    )
    return _SlotMap(slot_of_choice, choice_of_slot[:num_slots])


def _append_zero_row(x):
    return ops.concatenate([x, ops.zeros((1,) + tuple(x.shape[1:]), dtype=x.dtype)], axis=0)


def _gather_into_slots(tokens, slots):
    """`[T, M]` -> `[P, M]`, each slot holding its token (zeros where empty).

    The gradient gathers too: a token's gradient is the sum of its `k` slots' gradients.
    """
    top_k = slots.slot_of_choice.shape[-1]
    token_of_slot = slots.choice_of_slot // top_k

    @ops.custom_gradient
    def gather(tokens):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            per_choice = ops.take(_append_zero_row(upstream), slots.slot_of_choice, axis=0)
            return ops.sum(per_choice, axis=1)

        return ops.take(_append_zero_row(tokens), token_of_slot, axis=0), grad

    return gather(tokens)


def _combine_from_slots(slot_outputs, slots, combine_weights):
    """`y[t] = sum_j w[t, j] * slot_outputs[slot_of_choice[t, j]]`, `[P, M]` -> `[T, M]`.

    The weights are cast to the outputs' dtype (GShard combines in the activation dtype). The
    gradient gathers too: each slot receives its one token's output gradient times its weight.
    """
    top_k = slots.slot_of_choice.shape[-1]
    token_of_slot = slots.choice_of_slot // top_k
    weights_dtype = combine_weights.dtype

    @ops.custom_gradient
    def combine(slot_outputs, combine_weights):
        weights = ops.cast(combine_weights, slot_outputs.dtype)
        chosen = ops.take(_append_zero_row(slot_outputs), slots.slot_of_choice, axis=0)
        outputs = ops.sum(chosen * weights[..., None], axis=1)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            weight_of_slot = ops.take(
                _append_zero_row(ops.reshape(weights, (-1, 1))), slots.choice_of_slot, axis=0
            )
            upstream_of_slot = ops.take(_append_zero_row(upstream), token_of_slot, axis=0)
            slot_grad = upstream_of_slot * weight_of_slot
            weights_grad = ops.sum(chosen * upstream[:, None, :], axis=-1)
            return slot_grad, ops.cast(weights_grad, weights_dtype)

        return outputs, grad

    return combine(slot_outputs, combine_weights)


def _one_hot_dispatch_tensors(instructions, num_experts, capacity, dtype):
    """GShard's dispatch mask and combine tensor, both `[G, S, E, C]` in `dtype`."""
    dispatched = ops.cast(instructions.dispatched, "float32")
    expert_one_hot = ops.one_hot(instructions.expert_index, num_experts, dtype="float32")
    slot_one_hot = ops.one_hot(instructions.expert_position, capacity, dtype="float32")
    slot_one_hot = slot_one_hot * dispatched[..., None]
    dispatch_mask = ops.einsum("gske,gskc->gsec", expert_one_hot, slot_one_hot)
    combine_tensor = ops.einsum(
        "gske,gskc->gsec", expert_one_hot * instructions.combine_weights[..., None], slot_one_hot
    )
    return ops.cast(dispatch_mask, dtype), ops.cast(combine_tensor, dtype)


def _buffer_capacities(num_tokens):
    """The dropless buffer sizes compiled for `T` tokens: powers of two below `T`, then `T`.

    >>> _buffer_capacities(16), _buffer_capacities(12), _buffer_capacities(1)
    ([1, 2, 4, 8, 16], [1, 2, 4, 8, 12], [1])
    """
    capacities = [1]
    while capacities[-1] * 2 < num_tokens:
        capacities.append(capacities[-1] * 2)
    if capacities[-1] < num_tokens:
        capacities.append(num_tokens)
    return capacities


def _dropless_block_size(num_choices, num_experts):
    """Largest power of two (at most 128) whose padding rows `E * (b - 1)` stay within half the
    `num_choices` rows; 1 for decoding-sized inputs.

    Measured on CPU (T = 4096, M = 256, H = 1024, E = 64, top-2): b = 32 runs the forward pass as
    fast as capacity-based dispatch at capacity factor 2.5; b = 16 is 10% slower (more scan
    steps), b = 128 30% slower (more padding rows).
    """
    block_size = 1
    while (
        block_size * 2 <= _MAX_DROPLESS_BLOCK
        and num_experts * (block_size * 2 - 1) * 2 <= num_choices
    ):
        block_size *= 2
    return block_size


def _batch_devices_of_distribution():
    """Devices the active distribution splits the batch over (1 without one).

    Read from its data layout, whose batch entry may name several mesh axes (`ExpertParallel`
    splits the batch over `data x expert`).
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    batch_axes = distribution.get_data_layout((1,)).axes[0]
    if batch_axes is None:
        return 1
    if isinstance(batch_axes, str):
        batch_axes = (batch_axes,)
    mesh = distribution.device_mesh
    return math.prod(mesh.shape[mesh.axis_names.index(axis)] for axis in batch_axes)
