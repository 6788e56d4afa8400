"""Per-device memory and traffic of GLaM under expert parallelism, computed from the config alone.

No weight is allocated, so a 1.2T-parameter preset can be planned on a laptop. Weights follow the
same layout rules as `glam_layout_map`; their shapes are those of `docs/architecture.md`.
"""

import dataclasses
import math
import re

import keras

from keras_glam.distribution.layout_map import layout_rules
from keras_glam.layers.routing import expert_capacity
from keras_glam.models.glam_backbone import padded_vocabulary_size
from keras_glam.models.glam_presets import BACKBONE_PRESETS
from keras_glam.models.parameter_count import count_params
from keras_glam.models.parameter_count import is_moe_layer
from keras_glam.training.adafactor import GLaMAdafactor

_GIB = 2**30
_AXES = ("data", "expert", "model")
# Float32 whatever the dtype policy: the router and the routing statistics.
_ALWAYS_FLOAT32 = re.compile(r".*/moe/(router/kernel|expert_load|dropped_fraction)")


@dataclasses.dataclass(frozen=True)
class DistributionPlan:
    """What one training step of a GLaM model costs each device of a mesh.

    Byte counts are per device. Parameters, gradients and optimizer state are exact for the
    layouts of `glam_layout_map`; activations are an estimate of the main tensors autodiff keeps
    for the backward pass (see `plan`); communication counts the bytes each device sends.

    Attributes:
        model: the preset name, or `"custom config"`.
        mesh: `{"data": d, "expert": e, "model": m}`.
        fsdp: whether non-expert weights are also split over the expert axis.
        remat: whether activations assume per-layer rematerialisation.
        dtype: the Keras dtype policy planned for.
        batch_tokens: tokens per global batch.
        sequence_length: tokens per sequence.
        tokens_per_device: tokens of the batch each device routes (`batch / (data x expert)`).
        group_size: tokens per routing group.
        capacity: slots per expert and routing group in training (0 for a dense model).
        total_params: parameters of the model (`count_params`, padded vocabulary included).
        activated_params: parameters used per token.
        num_moe_layers: MoE layers.
        parameter_bytes: weights held by each device.
        gradient_bytes: gradients (variable dtype) of the trainable weights.
        optimizer_bytes: Adafactor state (factored second moments, momentum if any).
        activation_bytes: activations kept for the backward pass (estimate).
        all_to_all_bytes: bytes each device sends in the MoE all-to-alls of one step.
        gradient_reduce_bytes: bytes each device sends to sum gradients over the copies of each
            weight (ring all-reduce: `2 (r - 1) / r` times the shard, for `r` copies).
        weight_gather_bytes: bytes each device receives gathering `fsdp`-split weights (forward
            and backward).
        device_memory_bytes: memory of one device, or None when not given.
        problems: layouts that cannot work on this mesh, with their fixes (empty when fine).
    """

    model: str
    mesh: dict
    fsdp: bool
    remat: bool
    dtype: str
    batch_tokens: int
    sequence_length: int
    tokens_per_device: int
    group_size: int
    capacity: int
    total_params: int
    activated_params: int
    num_moe_layers: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    all_to_all_bytes: int
    gradient_reduce_bytes: int
    weight_gather_bytes: int
    device_memory_bytes: int = None
    problems: tuple = ()

    @property
    def num_devices(self):
        return math.prod(self.mesh.values())

    @property
    def total_bytes(self):
        """Parameters, gradients, optimizer state and activations, all live at once (a bound)."""
        return (
            self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes
            + self.activation_bytes
        )

    @property
    def fits(self):
        """True/False against `device_memory_bytes`; None when no device memory was given."""
        if self.device_memory_bytes is None:
            return None
        return not self.problems and self.total_bytes <= self.device_memory_bytes

    def __str__(self):
        mesh = " x ".join(f"{axis}={size}" for axis, size in self.mesh.items())
        policy = keras.dtype_policies.get(self.dtype)
        sequences = self.batch_tokens // self.sequence_length
        lines = [
            f"GLaM plan: {self.model} on {self.num_devices} devices, mesh {mesh}"
            + (", fsdp" if self.fsdp else ""),
            f"  model: {self.total_params:,} parameters ({self.activated_params:,} per token)"
            + (f", MoE layers: {self.num_moe_layers}" if self.num_moe_layers else ""),
            f"  batch: {self.batch_tokens:,} tokens ({sequences:,} x {self.sequence_length}), "
            f"{self.tokens_per_device:,} per device"
            + (
                f"; routing groups of {self.group_size:,}, capacity {self.capacity}"
                if self.num_moe_layers
                else ""
            ),
            "  memory per device (GiB):",
            _row(f"parameters ({policy.variable_dtype})", self.parameter_bytes),
            _row(f"gradients ({policy.variable_dtype})", self.gradient_bytes),
            _row("optimizer (Adafactor)", self.optimizer_bytes),
            _row(
                f"activations ({policy.compute_dtype}, "
                + ("layer remat" if self.remat else "no remat") + ", estimate)",
                self.activation_bytes,
            ),
            _row("total", self.total_bytes)
            + (
                ""
                if self.device_memory_bytes is None
                else f"  of {self.device_memory_bytes / _GIB:.1f}: "
                + ("fits" if self.fits else "does NOT fit")
            ),
            "  sent by each device per step (GiB):",
            _row(
                f"all-to-all ({'6' if self.remat else '4'} per MoE layer)",
                self.all_to_all_bytes,
            ),
            _row("gradient all-reduce", self.gradient_reduce_bytes),
        ]
        if self.fsdp:
            lines.append(_row("fsdp weight all-gathers", self.weight_gather_bytes))
        lines += [f"  problem: {problem}" for problem in self.problems]
        return "\n".join(lines)


def _row(label, num_bytes):
    return f"    {label:<48}{num_bytes / _GIB:>10.2f}"


def _resolve(preset_or_config):
    if isinstance(preset_or_config, str):
        if preset_or_config not in BACKBONE_PRESETS:
            raise ValueError(
                f"Unknown preset '{preset_or_config}'. Known presets: "
                f"{', '.join(sorted(BACKBONE_PRESETS))}. Or pass a GLaMBackbone config dict."
            )
        return preset_or_config, dict(BACKBONE_PRESETS[preset_or_config]["config"])
    if isinstance(preset_or_config, dict):
        return "custom config", dict(preset_or_config)
    raise TypeError(
        "Expected a preset name or a GLaMBackbone config dict, got "
        f"{type(preset_or_config).__name__}."
    )


def _mesh_sizes(mesh):
    if isinstance(mesh, keras.distribution.DeviceMesh):
        mesh = dict(zip(mesh.axis_names, mesh.shape))
    if not isinstance(mesh, dict):
        raise TypeError(
            "`mesh` must be a dict like {'data': 2, 'expert': 4, 'model': 1} or a "
            f"keras.distribution.DeviceMesh, got {type(mesh).__name__}."
        )
    unknown = set(mesh) - set(_AXES)
    if unknown:
        raise ValueError(f"Unknown mesh axes {sorted(unknown)}; plan() knows {list(_AXES)}.")
    sizes = {axis: int(mesh.get(axis, 1)) for axis in _AXES}
    if any(size < 1 for size in sizes.values()):
        raise ValueError(f"Mesh axis sizes must be positive, got {sizes}.")
    return sizes


def _embedding_rows(config):
    return padded_vocabulary_size(
        config["vocabulary_size"], config.get("pad_vocabulary_to_multiple_of", 1)
    )


def glam_weight_shapes(config):
    """`(path, shape, trainable)` of every weight a `GLaMBackbone` with `config` creates.

    Paths are those of `docs/architecture.md`, without any model-name prefix.
    """
    hidden, ffn = config["hidden_dim"], config["intermediate_dim"]
    heads, head_dim = config["num_heads"], config["head_dim"]
    experts = config.get("num_experts")
    weights = [("token_embedding/embeddings", (_embedding_rows(config), hidden), True)]
    for index in range(config["num_layers"]):
        block = f"decoder_block_{index}"
        weights.append((f"{block}/attention_norm/scale", (hidden,), True))
        for name in ("query", "key", "value"):
            weights.append((f"{block}/attention/{name}/kernel", (hidden, heads, head_dim), True))
        weights += [
            (f"{block}/attention/attention_output/kernel", (heads, head_dim, hidden), True),
            (
                f"{block}/attention/relative_bias/table",
                (heads, config.get("num_buckets", 32)),
                True,
            ),
            (f"{block}/feedforward_norm/scale", (hidden,), True),
        ]
        if is_moe_layer(index, experts, config.get("moe_layer_interval", 2)):
            weights += [
                (f"{block}/moe/router/kernel", (hidden, experts), True),
                (f"{block}/moe/expert_wi/kernel", (experts, hidden, ffn), True),
                (f"{block}/moe/expert_wo/kernel", (experts, ffn, hidden), True),
                (f"{block}/moe/expert_load", (experts,), False),
                (f"{block}/moe/dropped_fraction", (config.get("top_k", 2),), False),
            ]
        else:
            weights += [
                (f"{block}/ffn/ffn_gate/kernel", (hidden, ffn), True),
                (f"{block}/ffn/ffn_linear/kernel", (hidden, ffn), True),
                (f"{block}/ffn/ffn_output/kernel", (ffn, hidden), True),
            ]
    weights.append(("final_norm/scale", (hidden,), True))
    return weights


def _layout_of(path, rules):
    matches = [axes for key, axes in rules.items() if re.fullmatch(key, path)]
    if len(matches) != 1:
        raise AssertionError(f"{len(matches)} layout rules match '{path}'.")
    return matches[0]


def _parts(axes, sizes):
    return math.prod(sizes[axis] for axis in axes if axis is not None)


def _shard_elements(shape, axes, sizes, path, problems):
    elements = 1
    for dim, (size, axis) in enumerate(zip(shape, tuple(axes) + (None,) * len(shape))):
        parts = sizes[axis] if axis is not None else 1
        if size % parts:
            fix = (
                "set pad_vocabulary_to_multiple_of on the backbone"
                if path.startswith("token_embedding") and dim == 0
                else f"use a '{axis}' axis size that divides {size}"
            )
            problems.append(
                f"{path} {shape}: dimension {dim} ({size}) does not divide over '{axis}' "
                f"({parts}); {fix}."
            )
        elements *= -(-size // parts)
    return elements


def _activation_bytes_per_token(config, sizes, sequence_length, group_size, capacity, policy):
    """Per layer kind, bytes autodiff keeps per routed token (the main tensors, no remat)."""
    compute = _bytes(policy.compute_dtype)
    fp32 = 4
    tp = sizes["model"]
    hidden, ffn = config["hidden_dim"], config["intermediate_dim"]
    heads_dim = config["num_heads"] * config["head_dim"]
    residual_and_norm = 2 * hidden * compute
    # q, k, v and the attended values; float32 logits, softmax and its compute-dtype copy.
    attention = residual_and_norm + (
        4 * heads_dim * compute
        + config["num_heads"] * sequence_length * (2 * fp32 + compute)
    ) // tp
    # Gate and linear pre-activations and their product.
    dense = residual_and_norm + 3 * ffn * compute // tp
    moe = 0
    experts = config.get("num_experts")
    if experts:
        slots_per_token = experts * capacity / group_size
        dispatch_masks = (
            2 * experts * capacity * compute if _dispatch_mode(config) == "einsum" else 0
        )
        moe = residual_and_norm + int(
            2 * experts * fp32  # router logits and probabilities
            + dispatch_masks
            + slots_per_token * (2 * hidden * compute + ffn * compute / tp)
        )
    return {"attention": attention, "dense": dense, "moe": moe}


def _dispatch_mode(config):
    # "auto" picks einsum on TPU, where large models train; the plan assumes that.
    return "sort" if config.get("dispatch") in ("sort", "sort_loop") else "einsum"


def _bytes(dtype):
    return {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[
        keras.backend.standardize_dtype(dtype)
    ]


def plan(
    preset_or_config,
    mesh,
    batch_tokens,
    sequence_length=1024,
    fsdp=False,
    remat=False,
    dtype="mixed_bfloat16",
    capacity_factor=None,
    num_routing_groups=None,
    device_memory_gib=None,
    optimizer=None,
):
    """Per-device memory and communication of one GLaM training step on a mesh.

    Weights, gradients and optimizer slots are laid out exactly as `glam_layout_map` lays them
    out (`fsdp` as there), so their per-device bytes are exact. Activations are estimated from
    the tensors autodiff keeps per token and layer: the residual and normed inputs, q/k/v and
    attended values, float32 attention probabilities (`N * L` per token, split over `model`),
    the dense FFN's three `H`-wide tensors, the router's float32 logits and probabilities, the
    GShard dispatch and combine masks (`2 * E * C` per token in `"einsum"` mode) and the
    dispatched expert inputs, hidden states and outputs (`E * C / S` slots per token). With
    `remat=True` each decoder layer is assumed rematerialised (`keras.RematScope`): only layer
    inputs are kept, plus one layer's tensors while it is recomputed.

    All-to-all traffic follows GShard's accounting: each device holds `E * C ~= cf * S` slots
    of `M` values after dispatch, of which `(P - 1) / P` come from the other `P - 1` devices of
    its expert group, so one all-to-all sends `cf * S * M * bytes * (P - 1) / P` per device. A
    MoE layer runs four per step: dispatch and combine in the forward pass, and their
    transposes (the gradients of dispatch and combine) in the backward pass; six with remat,
    which repeats the forward pair. Summed over the `data x expert` devices this is
    `4 * cf * T * M * bytes * (P - 1) / P` per MoE layer for a batch of `T` tokens.

    Args:
        preset_or_config: a preset name (`"glam_64b_64e"`) or a `GLaMBackbone` config dict.
        mesh: `{"data": d, "expert": e, "model": m}` (missing axes are 1) or a `DeviceMesh`.
        batch_tokens: int, tokens per global batch (GLaM: about 1M).
        sequence_length: int, tokens per sequence (GLaM: 1024).
        fsdp: split non-expert weights over the expert axis too (`expert_parallel(fsdp=...)`).
        remat: assume per-layer rematerialisation of activations.
        dtype: Keras dtype policy (`"mixed_bfloat16"`: float32 weights, bfloat16 activations).
        capacity_factor: training capacity factor; default the config's (GLaM: 2.0).
        num_routing_groups: routing groups of the batch; None (the layers' default) is one per
            batch shard. More groups shrink the `"einsum"` dispatch masks (`2 * E * C` values per
            token, `C` proportional to the group size).
        device_memory_gib: memory of one device (TPU v4: 32), for the `fits` verdict.
        optimizer: a `GLaMAdafactor` whose slots to count; default GLaM's settings.

    Returns:
        A `DistributionPlan`; `print` it for a readable report.

    Example:
    ```python
    report = keras_glam.distribution.plan(
        "glam_64b_64e", {"expert": 64, "model": 8}, batch_tokens=2**19,
        fsdp=True, remat=True, device_memory_gib=32)
    print(report)
    ```
    """
    name, config = _resolve(preset_or_config)
    sizes = _mesh_sizes(mesh)
    for argument, value in (("batch_tokens", batch_tokens), ("sequence_length", sequence_length)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{argument}` must be a positive int, got {value!r}.")
    policy = keras.dtype_policies.get(dtype)
    optimizer = optimizer or GLaMAdafactor()
    if not isinstance(optimizer, GLaMAdafactor):
        raise TypeError(
            f"plan() counts GLaMAdafactor's slots; got {type(optimizer).__name__}. Pass a "
            "GLaMAdafactor (or None for GLaM's settings)."
        )
    problems = []
    batch_shards = sizes["data"] * sizes["expert"]
    if batch_tokens % sequence_length or (batch_tokens // sequence_length) % batch_shards:
        problems.append(
            f"{batch_tokens:,} tokens are not whole sequences of {sequence_length} on each of "
            f"the data x expert = {batch_shards} batch shards; use a multiple of "
            f"{sequence_length * batch_shards:,}."
        )
    tokens_per_device = max(batch_tokens // batch_shards, 1)
    num_groups = num_routing_groups or batch_shards
    if num_groups % batch_shards or batch_tokens % num_groups:
        problems.append(
            f"num_routing_groups={num_groups} must be a multiple of the {batch_shards} batch "
            f"shards and divide the {batch_tokens:,} tokens."
        )
    group_size = max(batch_tokens // num_groups, 1)
    experts = config.get("num_experts")

    rules = layout_rules(_AXES, fsdp=fsdp)
    variable_bytes = _bytes(policy.variable_dtype)
    parameter_bytes = gradient_bytes = optimizer_bytes = reduce_bytes = gather_bytes = 0
    num_devices = math.prod(sizes.values())
    for path, shape, trainable in glam_weight_shapes(config):
        axes = _layout_of(path, rules)
        weight_bytes = 4 if _ALWAYS_FLOAT32.fullmatch(path) else variable_bytes
        shard = _shard_elements(shape, axes, sizes, path, problems) * weight_bytes
        parameter_bytes += shard
        if not trainable:
            continue
        gradient_bytes += shard
        copies = num_devices // _parts(axes, sizes)
        reduce_bytes += 2 * (copies - 1) * shard // copies
        if fsdp and "expert" in axes and "/moe/" not in path:
            # Gathered whole before the forward and the backward use, and its gradient
            # reduce-scattered back to the shards.
            gather_bytes += 2 * shard * (sizes["expert"] - 1)
            reduce_bytes += shard * (sizes["expert"] - 1)
        optimizer_bytes += _optimizer_shard_bytes(optimizer, shape, axes, sizes)

    capacity = 0
    if experts:
        factor = capacity_factor if capacity_factor is not None else config.get(
            "capacity_factor", 2.0
        )
        capacity = expert_capacity(group_size, experts, factor)
    per_token = _activation_bytes_per_token(
        config, sizes, sequence_length, group_size, capacity, policy
    )
    layer_kinds = [
        "moe" if is_moe_layer(i, experts, config.get("moe_layer_interval", 2)) else "dense"
        for i in range(config["num_layers"])
    ]
    num_moe_layers = layer_kinds.count("moe")
    compute = _bytes(policy.compute_dtype)
    # Final norm, float32 logits and their softmax, vocabulary split over `model`.
    head = 2 * config["hidden_dim"] * compute + (
        2 * 4 * _embedding_rows(config) // sizes["model"]
    )
    layer_bytes = [per_token["attention"] + per_token[kind] for kind in layer_kinds]
    if remat:
        kept = config["num_layers"] * config["hidden_dim"] * compute + max(layer_bytes)
    else:
        kept = sum(layer_bytes)
    activation_bytes = tokens_per_device * (kept + head)

    groups_per_device = max(num_groups // batch_shards, 1)
    slots_per_device = experts * capacity * groups_per_device if experts else 0
    all_to_all_bytes = int(
        (6 if remat else 4)
        * num_moe_layers
        * slots_per_device
        * config["hidden_dim"]
        * compute
        * (sizes["expert"] - 1)
        / sizes["expert"]
    )
    total, activated = count_params(config, vocabulary_size=_embedding_rows(config))
    return DistributionPlan(
        model=name,
        mesh=sizes,
        fsdp=fsdp,
        remat=remat,
        dtype=policy.name,
        batch_tokens=batch_tokens,
        sequence_length=sequence_length,
        tokens_per_device=tokens_per_device,
        group_size=group_size,
        capacity=capacity,
        total_params=total,
        activated_params=activated,
        num_moe_layers=num_moe_layers,
        parameter_bytes=parameter_bytes,
        gradient_bytes=gradient_bytes,
        optimizer_bytes=optimizer_bytes,
        activation_bytes=activation_bytes,
        all_to_all_bytes=all_to_all_bytes,
        gradient_reduce_bytes=reduce_bytes,
        weight_gather_bytes=gather_bytes,
        device_memory_bytes=None if device_memory_gib is None else int(device_memory_gib * _GIB),
        problems=tuple(problems),
    )


def _optimizer_shard_bytes(optimizer, shape, axes, sizes):
    """Bytes of the float32 slots `GLaMAdafactor` keeps for one weight, per device."""
    axes = tuple(axes) + (None,) * (len(shape) - len(axes))
    factored = optimizer.factored_dims(shape)
    slots = []
    if factored is None:
        slots.append((shape, axes))
    else:
        for removed in factored:
            slots.append(
                (
                    tuple(s for i, s in enumerate(shape) if i != removed),
                    tuple(a for i, a in enumerate(axes) if i != removed),
                )
            )
    if optimizer.beta_1:
        slots.append((shape, axes))
    return sum(
        4 * math.prod(-(-size // (sizes[axis] if axis else 1)) for size, axis in zip(s, a))
        for s, a in slots
    )


def propose_mesh(
    num_devices,
    preset_or_config,
    batch_tokens=None,
    sequence_length=1024,
    device_memory_gib=None,
    remat=False,
    dtype="mixed_bfloat16",
):
    """Propose `expert_parallel` arguments for `num_devices` devices.

    Tries every `data x expert x model` factorisation of `num_devices` (with `fsdp` off and
    on) whose layouts divide the model's shapes and, when `device_memory_gib` is given, whose
    `plan` fits. Among those it prefers, in this order: the largest `expert` axis (GShard's
    layout: experts spread over as many devices as there are experts, fewest copies of each);
    the smallest `model` axis (tensor parallelism communicates in every layer); no `fsdp`
    (it gathers the dense weights in every step).

    Args:
        num_devices: int, devices of the slice (JAX devices: chips on TPU v4, GPUs).
        preset_or_config: a preset name or a `GLaMBackbone` config dict.
        batch_tokens: tokens per global batch; None plans one sequence per batch shard.
        sequence_length: tokens per sequence.
        device_memory_gib: memory of one device; None skips the memory check.
        remat: plan with per-layer rematerialisation.
        dtype: Keras dtype policy.

    Returns:
        dict with keys `data`, `expert`, `model`, `fsdp`: keyword arguments of
        `keras_glam.distribution.expert_parallel`.

    Example:

    >>> propose_mesh(8, "glam_tiny_8e")
    {'data': 1, 'expert': 8, 'model': 1, 'fsdp': False}
    """
    if not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"`num_devices` must be a positive int, got {num_devices!r}.")
    _, config = _resolve(preset_or_config)
    experts = config.get("num_experts") or 1
    candidates = []
    for expert in _divisors(math.gcd(num_devices, experts)):
        for model in _divisors(num_devices // expert):
            data = num_devices // (expert * model)
            for fsdp in (False, True) if expert > 1 else (False,):
                mesh = {"data": data, "expert": expert, "model": model}
                tokens = batch_tokens or sequence_length * data * expert
                candidate = plan(
                    config, mesh, tokens, sequence_length, fsdp=fsdp, remat=remat,
                    dtype=dtype, device_memory_gib=device_memory_gib,
                )
                candidates.append(candidate)
    usable = [c for c in candidates if not c.problems and c.fits is not False]
    if not usable:
        smallest = min(candidates, key=lambda c: (len(c.problems), c.total_bytes))
        raise ValueError(
            f"No data x expert x model mesh of {num_devices} devices fits this model. The "
            f"smallest footprint:\n{smallest}\nUse more devices, remat=True, a smaller batch, "
            "or a smaller preset."
        )
    best = min(usable, key=lambda c: (-c.mesh["expert"], c.mesh["model"], c.fsdp))
    return {**best.mesh, "fsdp": best.fsdp}


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]
