"""Where every GLaM weight lives on a device mesh: the layout rules and the `LayoutMap`.

The rules are the model's own knowledge (which weight axis is split over which mesh axis), so
they live with the models: `GLaMBackbone.get_layout_map` returns the map without importing
`keras_glam.distribution`, which builds on them (`ExpertParallel`, the planner) and re-exports
them (`keras_glam.distribution.glam_layout_map`, `layout_rules`, ...).

The mesh has up to three named axes (any of them may be missing or of size 1):

- `data`: pure data parallelism. Every weight is replicated over it.
- `expert`: the GShard axis. Expert kernels are split over it on their expert dimension, the
  batch is split over it as well (over `data x expert`), so tokens travel to their experts by
  all-to-all. With `fsdp=True` the model dimension of every other large weight is split over it
  too and gathered before use, the 2-D layout praxis gives GLaM.
- `model`: tensor parallelism. Attention heads, the FFN hidden size `H` (dense and expert) and
  the vocabulary are split over it.

The rules follow praxis' canonical GLaM sharding (`transformer_models.set_sharding_params_v1`,
mesh axes `(replica, data, mdl)`, here `data`, `expert`, `model`): experts `emh = [data, None,
mdl]`, `ehm = [data, mdl, None]`, router `me` replicated, attention `[data, mdl, None]`, dense FFN
`[data, mdl]` / `[mdl, data]`, embedding `[mdl, data]`, batch over `(replica, data)`, dispatched
activations `egcm = [data, None, None, ...]`. Praxis always splits the dense weights over its data
axis; here that is the opt-in `fsdp`.

Besides weights, the map holds four activation layouts that `MoEFeedForward` looks up under its
`layer.path`: `expert_inputs_by_group`, `expert_inputs`, `expert_outputs`,
`expert_outputs_by_group`, all `[E, G, C, M]`. Constraining the dispatched tokens first by
routing group (where the tokens are) and then by expert is what makes XLA move them with one
all-to-all each way, as GShard does; a constraint on the expert side alone lets XLA all-gather
tokens or expert kernels instead (measured on 8 CPU devices: 0 all-to-all and 14 all-gathers
per training step, against 4 all-to-all per MoE layer and no all-gather with all four).
"""

import keras

# Weights deliberately kept whole on every device, as `{layout-map key: rank}`: small, or read
# in full by every token. They are keys of the map, so "replicated" is a recorded decision and
# never a silent miss.
REPLICATED_WEIGHTS = {
    # [M, E] float32 router: every token needs all E logits (praxis: `me = [None, None]`).
    r".*decoder_block_\d+/moe/router/kernel": 2,
    # [M] RMSNorm scales.
    r".*(attention_norm|feedforward_norm|final_norm)/scale": 1,
    # [E] and [top_k] routing statistics (non-trainable).
    r".*decoder_block_\d+/moe/(expert_load|dropped_fraction)": 1,
}


class MultiAxisLayout(keras.distribution.TensorLayout):
    """A `TensorLayout` whose entries may be tuples of mesh axes.

    JAX's `PartitionSpec(("data", "expert"), None)` splits one dimension over two mesh axes;
    Keras 3.15's `TensorLayout` accepts such an entry but validates only single names, so this
    subclass widens the check. GLaM splits its batch (and routing groups) over `data x expert`.

    Example:

    >>> mesh = keras.distribution.DeviceMesh((1, 1), ("data", "expert"))
    >>> MultiAxisLayout((("data", "expert"), None), mesh).axes
    (('data', 'expert'), None)
    """

    def _validate_axes(self):
        if self.device_mesh is None:
            return
        used = {name for entry in self.axes for name in axis_names_of(entry)}
        unknown = used - set(self.device_mesh.axis_names)
        if unknown:
            raise ValueError(
                f"Unknown mesh axes {sorted(unknown)} in layout {self.axes}; the mesh has "
                f"{list(self.device_mesh.axis_names)}."
            )


def axis_names_of(entry):
    """The mesh axes one tensor dimension is split over: from `None`, `"a"` or `("a", "b")`."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _joint_axis(*axes):
    """One layout entry splitting a dimension over every present axis of `axes`."""
    present = tuple(axis for axis in axes if axis is not None)
    if len(present) > 1:
        return present
    return present[0] if present else None


def layout_rules(
    mesh_axis_names, data_axis="data", expert_axis="expert", model_axis="model", fsdp=False
):
    """The GLaM layout rules as an ordered `{regex: axes}` dict.

    Every regex starts with `.*` and is matched with `re.fullmatch` against `variable.path`
    (weights) or `f"{moe_layer.path}/expert_inputs"` and its companions (MoE activations). An
    axis name missing from `mesh_axis_names` counts as a mesh axis of size 1 (nothing is split
    over it).

    Args:
        mesh_axis_names: the axis names of the device mesh.
        data_axis: name of the pure data-parallel axis.
        expert_axis: name of the axis experts (and the batch) are split over.
        model_axis: name of the tensor-parallel axis.
        fsdp: also split the model dimension of the attention, dense FFN and embedding weights
            over `expert_axis` (praxis' 2-D weight layout); XLA all-gathers them before use.

    Returns:
        dict mapping regex to a tuple of mesh axis names (or None) per tensor dimension.

    Example:

    >>> rules = layout_rules(("data", "expert", "model"))
    >>> rules[r".*decoder_block_\\d+/moe/expert_wi/kernel"]
    ('expert', None, 'model')
    """
    names = set(mesh_axis_names)
    roles = {"data_axis": data_axis, "expert_axis": expert_axis, "model_axis": model_axis}
    for role, axis in roles.items():
        if axis is not None and not isinstance(axis, str):
            raise TypeError(f"`{role}` must be a mesh axis name (str) or None, got {axis!r}.")
    present = [axis for axis in (data_axis, expert_axis, model_axis) if axis in names]
    if len(set(present)) != len(present):
        raise ValueError(
            f"`data_axis`, `expert_axis` and `model_axis` must be different mesh axes, got "
            f"{data_axis!r}, {expert_axis!r}, {model_axis!r}."
        )
    data = data_axis if data_axis in names else None
    expert = expert_axis if expert_axis in names else None
    model = model_axis if model_axis in names else None
    shard_m = expert if fsdp else None
    batch = _joint_axis(data, expert)
    block = r".*decoder_block_\d+"
    rules = {
        # [V, M]: vocabulary over `model` (pad V to a multiple of it), M over `expert` if fsdp.
        r".*token_embedding/embeddings": (model, shard_m),
        # [M, N, Dh] and [N, Dh, M]: heads over `model` (Megatron-style attention).
        block + r"/attention/(query|key|value)/kernel": (shard_m, model, None),
        block + r"/attention/attention_output/kernel": (model, None, shard_m),
        # [N, 32]: the bias of each head lives with the head.
        block + r"/attention/relative_bias/table": (model, None),
        # [M, H] and [H, M]: the hidden size over `model`.
        block + r"/ffn/(ffn_gate|ffn_linear)/kernel": (shard_m, model),
        block + r"/ffn/ffn_output/kernel": (model, shard_m),
        # [E, M, H] and [E, H, M]: experts over `expert`, their hidden size over `model`.
        block + r"/moe/expert_wi/kernel": (expert, None, model),
        block + r"/moe/expert_wo/kernel": (expert, model, None),
        # The MoE dispatched activations and expert outputs [E, G, C, M], looked up by
        # `MoEFeedForward` under `{layer.path}/...`: by group, the groups sit on the devices that
        # hold their tokens (the batch shards), so dispatch and combine run locally; by expert,
        # each expert's slots sit on its device, groups staying in their data-parallel replica.
        # Each change between the two is one all-to-all over `expert`.
        block + r"/moe/expert_inputs_by_group": (None, batch, None, None),
        block + r"/moe/expert_inputs": (expert, data, None, None),
        block + r"/moe/expert_outputs": (expert, data, None, None),
        block + r"/moe/expert_outputs_by_group": (None, batch, None, None),
    }
    rules.update({key: (None,) * rank for key, rank in REPLICATED_WEIGHTS.items()})
    return rules


def glam_layout_map(
    device_mesh, data_axis="data", expert_axis="expert", model_axis="model", fsdp=False
):
    """A `keras.distribution.LayoutMap` for `GLaMBackbone` / `GLaMCausalLM` on `device_mesh`.

    Covers every weight of the model (expert kernels on the expert axis, attention heads, FFN
    hidden sizes and the vocabulary on the model axis, `REPLICATED_WEIGHTS` whole) and the MoE
    dispatched activations `[E, G, C, M]` under `{moe_layer.path}/expert_inputs` (and the three
    companion keys of the module docstring), which `MoEFeedForward` looks up so that XLA moves
    tokens to their experts and back with all-to-all. See `layout_rules` for the arguments.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh`.
        data_axis: name of the pure data-parallel axis.
        expert_axis: name of the expert (GShard) axis.
        model_axis: name of the tensor-parallel axis.
        fsdp: also split the non-expert weights' model dimension over `expert_axis`.

    Returns:
        A `keras.distribution.LayoutMap`.

    Example:

    >>> mesh = keras.distribution.DeviceMesh((1, 1, 1), ("data", "expert", "model"))
    >>> layout_map = glam_layout_map(mesh)
    >>> layout_map["decoder_block_0/moe/expert_wo/kernel"].axes
    ('expert', 'model', None)
    """
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise TypeError(
            "`device_mesh` must be a keras.distribution.DeviceMesh, got "
            f"{type(device_mesh).__name__}. Build one with keras.distribution.DeviceMesh("
            "shape, axis_names, devices), or use keras_glam.distribution.expert_parallel()."
        )
    layout_map = keras.distribution.LayoutMap(device_mesh)
    rules = layout_rules(device_mesh.axis_names, data_axis, expert_axis, model_axis, fsdp)
    for key, axes in rules.items():
        layout_map[key] = MultiAxisLayout(axes, device_mesh)
    return layout_map
