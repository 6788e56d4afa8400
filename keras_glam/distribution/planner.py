"""Per-device memory and traffic of GLaM under expert parallelism, computed from the config alone.

No weight is allocated, so a 1.2T-parameter preset can be planned on a laptop. Weights follow the
same layout rules as `glam_layout_map`; their names, shapes and dtypes are those of
`keras_glam.models.architecture.weight_shapes`. Given the run's tokens, the report adds its
bill (`compute_bill`).
"""

import dataclasses
import math
import re

import keras

from keras_glam.distribution.compute_bill import ComputeOptimalSize
from keras_glam.distribution.compute_bill import TrainingBill
from keras_glam.distribution.compute_bill import compute_optimal_size
from keras_glam.distribution.compute_bill import training_bill
from keras_glam.distribution.expert_parallel import MESH_AXES
from keras_glam.distribution.expert_parallel import expert_parallel
from keras_glam.distribution.expert_parallel import num_batch_shards
from keras_glam.layers.routing import expert_capacity
from keras_glam.models.architecture import EMBEDDING
from keras_glam.models.architecture import MIXED_PRECISION_POLICY
from keras_glam.models.architecture import is_moe_layer
from keras_glam.models.architecture import resolve_config
from keras_glam.models.architecture import weight_shapes
from keras_glam.models.layout_rules import layout_rules
from keras_glam.models.memory_check import bytes_per_element
from keras_glam.models.parameter_count import count_params
from keras_glam.optimizers.adafactor import GLaMAdafactor

_GIB = 2**30


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
        bill: the `TrainingBill` of the whole run, when `plan` was given `training_tokens`.
        compute_optimal: Chinchilla's `ComputeOptimalSize` for the bill's FLOPs, with it.
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
    bill: TrainingBill = None
    compute_optimal: ComputeOptimalSize = None

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
        if self.bill is not None:
            lines += [str(self.bill), str(self.compute_optimal)]
        return "\n".join(lines)


def _row(label, num_bytes):
    return f"    {label:<48}{num_bytes / _GIB:>10.2f}"


def parse_mesh_spec(spec):
    """`"data=2,expert=4"` -> `{"data": 2, "expert": 4}`: the axes given, over `MESH_AXES`.

    Example:

    >>> parse_mesh_spec("expert=64,model=8")
    {'expert': 64, 'model': 8}
    """
    axes = {}
    for part in spec.split(","):
        name, _, size = (piece.strip() for piece in part.partition("="))
        if name not in MESH_AXES or name in axes or not size.isdigit() or int(size) < 1:
            raise ValueError(
                f"A mesh is axis=size pairs over the axes {', '.join(MESH_AXES)}, e.g. "
                f"data=2,expert=4; got {spec!r}."
            )
        axes[name] = int(size)
    return axes


def _mesh_sizes(mesh):
    if isinstance(mesh, str):
        mesh = parse_mesh_spec(mesh)
    if isinstance(mesh, keras.distribution.DeviceMesh):
        mesh = dict(zip(mesh.axis_names, mesh.shape))
    if not isinstance(mesh, dict):
        raise TypeError(
            "`mesh` must be a dict like {'data': 2, 'expert': 4, 'model': 1}, a spec like "
            f"'data=2,expert=4' or a keras.distribution.DeviceMesh, got {type(mesh).__name__}."
        )
    unknown = set(mesh) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"Unknown mesh axes {sorted(unknown)}; plan() knows {list(MESH_AXES)}.")
    sizes = {axis: int(mesh.get(axis, 1)) for axis in MESH_AXES}
    if any(size < 1 for size in sizes.values()):
        raise ValueError(f"Mesh axis sizes must be positive, got {sizes}.")
    return sizes


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
    compute = bytes_per_element(policy.compute_dtype)
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


def plan(
    preset_or_config,
    mesh,
    batch_tokens,
    sequence_length=1024,
    fsdp=False,
    remat=False,
    dtype=MIXED_PRECISION_POLICY,
    capacity_factor=None,
    num_routing_groups=None,
    device_memory_gib=None,
    optimizer=None,
    training_tokens=None,
    hardware=None,
    mfu=None,
    energy_mwh=None,
    training_hours=None,
):
    """Per-device memory and communication of one GLaM training step on a mesh; with
    `training_tokens`, the run's bill and Chinchilla's compute-optimal size too.

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
        mesh: `{"data": d, "expert": e, "model": m}` (missing axes are 1), the same as a
            string `"data=d,expert=e,model=m"` (`parse_mesh_spec`), or a `DeviceMesh`.
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
        training_tokens: tokens of the whole run: adds the bill (`training_bill`, the mesh's
            devices as chips) and `compute_optimal_size` of its FLOPs to the report.
        hardware: a `keras_glam.distribution.Hardware` for chip-hours and energy, with one of
            `mfu` (assumed), `energy_mwh` or `training_hours` (reported: the MFU they imply).
        mfu: assumed model FLOPs utilisation in (0, 1].
        energy_mwh: the run's reported energy.
        training_hours: the run's reported wall-clock hours on this mesh.

    Returns:
        A `DistributionPlan`; `print` it for a readable report.

    Example:
    ```python
    report = keras_glam.distribution.plan(
        "glam_64b_64e", {"data": 2, "expert": 64, "model": 8}, batch_tokens=2**20,
        fsdp=True, remat=True, device_memory_gib=32,
        training_tokens=600e9, hardware=keras_glam.distribution.GLAM_TPU_V4, energy_mwh=456)
    print(report)   # ... chip-hours at MFU 27.7% (implied by 456 MWh) ...
    ```
    """
    name, config = resolve_config(preset_or_config)
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
    batch_shards = num_batch_shards(sizes)
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

    rules = layout_rules(MESH_AXES, fsdp=fsdp)
    variable_bytes = bytes_per_element(policy.variable_dtype)
    parameter_bytes = gradient_bytes = optimizer_bytes = reduce_bytes = gather_bytes = 0
    num_devices = math.prod(sizes.values())
    weights = weight_shapes(config)
    for path, shape, trainable, pinned_dtype, _ in weights:
        axes = _layout_of(path, rules)
        weight_bytes = bytes_per_element(pinned_dtype) if pinned_dtype else variable_bytes
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
        optimizer_bytes += _optimizer_shard_bytes(optimizer, path, shape, axes, sizes)

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
    compute = bytes_per_element(policy.compute_dtype)
    # Final norm, float32 logits and their softmax, vocabulary split over `model`.
    head = 2 * config["hidden_dim"] * compute + (
        2 * 4 * next(w.shape[0] for w in weights if w.role == EMBEDDING) // sizes["model"]
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
    total, activated = count_params(config)
    bill = optimal = None
    if training_tokens is not None:
        bill = training_bill(
            preset_or_config, training_tokens, hardware, mfu=mfu, energy_mwh=energy_mwh,
            hours=training_hours, num_chips=num_devices, sequence_length=sequence_length,
        )
        optimal = compute_optimal_size(bill.total_flops)
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
        bill=bill,
        compute_optimal=optimal,
    )


def _optimizer_shard_bytes(optimizer, path, shape, axes, sizes):
    """Bytes of the float32 slots `GLaMAdafactor` keeps for one weight, per device."""
    axes = tuple(axes) + (None,) * (len(shape) - len(axes))
    factored = optimizer.factored_axes(path, shape)
    slots = []
    if factored is None:
        slots.append((shape, axes))
    else:
        # Each factored slot is a mean over one group of the weight's axes.
        for removed in factored:
            slots.append(
                (
                    tuple(s for i, s in enumerate(shape) if i not in removed),
                    tuple(a for i, a in enumerate(axes) if i not in removed),
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
    dtype=MIXED_PRECISION_POLICY,
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
    _, config = resolve_config(preset_or_config)
    experts = config.get("num_experts") or 1
    candidates = []
    for expert in _divisors(math.gcd(num_devices, experts)):
        for model in _divisors(num_devices // expert):
            data = num_devices // (expert * model)
            for fsdp in (False, True) if expert > 1 else (False,):
                mesh = {"data": data, "expert": expert, "model": model}
                tokens = batch_tokens or sequence_length * num_batch_shards(mesh)
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


def mesh_distribution(mesh_spec, batch_size, num_experts=None):
    """The `expert_parallel` distribution of a mesh spec such as "data=2,expert=4", or None.

    Checks that the mesh fits the devices, a global batch of `batch_size` rows and a model of
    `num_experts` experts (None: dense); raises `ValueError` naming the fix otherwise.

    Args:
        mesh_spec: "axis=size,..." over `MESH_AXES` (`parse_mesh_spec`), or None.
        batch_size: global rows per step.
        num_experts: experts per MoE layer of the model, or None.
    """
    if mesh_spec is None:
        return None
    axes = parse_mesh_spec(mesh_spec)
    batch_shards = num_batch_shards(axes)
    if batch_size % batch_shards:
        raise ValueError(
            f"--batch-size {batch_size} cannot be split over the {batch_shards} batch shards "
            f"of --mesh {mesh_spec} (data x expert): choose a multiple of {batch_shards}."
        )
    if num_experts and num_experts % axes.get("expert", 1):
        raise ValueError(
            f"--mesh {mesh_spec}: the expert axis must divide the preset's {num_experts} experts."
        )
    devices = keras.distribution.list_devices()
    needed = batch_shards * axes.get("model", 1)
    if "data" in axes and needed != len(devices):
        raise ValueError(
            f"--mesh {mesh_spec} needs {needed} devices, there are {len(devices)}. Leave out "
            "`data=` to use every device, or on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} before starting."
        )
    return expert_parallel(
        data=axes.get("data"), expert=axes.get("expert", 1), model=axes.get("model", 1)
    )
