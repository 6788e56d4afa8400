"""`ExpertParallel`: GShard's data x expert (x tensor) parallelism as a `keras.distribution`."""

import math

import keras

from keras_glam.models.layout_rules import MultiAxisLayout
from keras_glam.models.layout_rules import axis_names_of
from keras_glam.models.layout_rules import glam_layout_map

MESH_AXES = ("data", "expert", "model")
# GShard splits the batch over the data and expert axes: each device of an expert group routes
# its own tokens.
BATCH_AXES = ("data", "expert")


def num_batch_shards(mesh):
    """The number of parts a global batch is split into on `mesh`: `data x expert`.

    Every batch (and every routing group count) must divide by it.

    Args:
        mesh: `{axis name: size}`, e.g. from `parse_mesh_spec`; a missing axis has size 1.

    Returns:
        int.

    Example:

    >>> num_batch_shards({"data": 2, "expert": 4, "model": 8})
    8
    """
    return math.prod(mesh.get(axis, 1) for axis in BATCH_AXES)


def _axes_size(device_mesh, entry):
    return math.prod(
        device_mesh.shape[device_mesh.axis_names.index(name)] for name in axis_names_of(entry)
    )


class ExpertParallel(keras.distribution.ModelParallel):
    """`ModelParallel` whose batch is split over several mesh axes, as GShard splits it.

    Weights follow `layout_map` exactly as in `ModelParallel`. The difference is the input
    batch: it is split over every axis in `batch_axes` (default `data x expert`), so each device
    of an expert group routes its own tokens and the MoE layers exchange them by all-to-all.
    Keras' `ModelParallel` splits the batch over one axis only, which would make every device
    of an expert group compute the same attention on the same tokens.

    Every sharded weight dimension must divide the product of its mesh axes; a weight that does
    not raises a `ValueError` naming the weight and the fix (for the vocabulary: build the
    backbone with `pad_vocabulary_to_multiple_of`).

    With several processes each reads its own shard of a batched `tf.data.Dataset` (Keras'
    `distribute_dataset`, applied by `fit` when `auto_shard_dataset` is True): process `p` of
    `n` gets rows `[p * B / n, (p + 1) * B / n)` of every global batch of `B` rows (batch with
    `drop_remainder=True`: Keras needs the static batch size). Every batch, `generate()`'s
    included, must divide over the batch shards.

    Args:
        layout_map: a `keras.distribution.LayoutMap`, e.g. `GLaMBackbone.get_layout_map(mesh)`.
        batch_axes: mesh axes the batch dimension is split over, outermost first.
        auto_shard_dataset: let `fit` shard a `tf.data.Dataset` per process (False when your
            pipeline already yields each process's own rows).

    Example:
    ```python
    mesh = keras.distribution.DeviceMesh((2, 4, 1), ("data", "expert", "model"))
    distribution = keras_glam.distribution.ExpertParallel(
        keras_glam.GLaMBackbone.get_layout_map(mesh))
    with distribution.scope():
        lm = keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e", dispatch="einsum")
    ```
    """

    def __init__(self, layout_map, batch_axes=BATCH_AXES, auto_shard_dataset=True):
        if not isinstance(layout_map, keras.distribution.LayoutMap):
            raise TypeError(
                "`layout_map` must be a keras.distribution.LayoutMap, got "
                f"{type(layout_map).__name__}. Use GLaMBackbone.get_layout_map(device_mesh)."
            )
        batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
        mesh_axes = layout_map.device_mesh.axis_names
        if not batch_axes or any(axis not in mesh_axes for axis in batch_axes):
            raise ValueError(
                f"`batch_axes` must be a non-empty subset of the mesh axes {list(mesh_axes)}, "
                f"got {batch_axes}."
            )
        # Read by `num_model_replicas`, which `ModelParallel.__init__` already calls.
        self._batch_axes = batch_axes
        super().__init__(
            layout_map=layout_map,
            batch_dim_name=batch_axes[0],
            auto_shard_dataset=auto_shard_dataset,
        )

    @property
    def batch_axes(self):
        """The mesh axes the batch is split over."""
        return self._batch_axes

    @property
    def num_model_replicas(self):
        """Number of batch shards (Keras' name for it): the product of the batch axes' sizes."""
        return _axes_size(self.device_mesh, self._batch_axes)

    def get_data_layout(self, data_shape):
        axes = [None] * len(data_shape)
        axes[0] = self._batch_axes if len(self._batch_axes) > 1 else self._batch_axes[0]
        return MultiAxisLayout(axes, self.device_mesh)

    def get_variable_layout(self, variable):
        layout = super().get_variable_layout(variable)
        _check_divides(variable.path, variable.shape, layout)
        return layout


def _check_divides(path, shape, layout):
    if not isinstance(layout, keras.distribution.TensorLayout) or layout.device_mesh is None:
        return
    for dim, (size, entry) in enumerate(zip(shape, layout.axes)):
        parts = _axes_size(layout.device_mesh, entry)
        if size % parts == 0:
            continue
        if path.endswith("token_embedding/embeddings") and dim == 0:
            fix = (
                "pad the vocabulary: build the backbone with "
                f"pad_vocabulary_to_multiple_of={parts} (or a multiple of it); the padded logits "
                "are masked"
            )
        else:
            fix = (
                f"choose mesh axis sizes that divide {size}, or a model whose dimension "
                f"{dim} divides by {parts}"
            )
        raise ValueError(
            f"Weight '{path}' of shape {tuple(shape)} cannot be split: dimension {dim} ({size}) "
            f"is laid out over mesh axes {axis_names_of(entry)} of total size {parts}, which does "
            f"not divide it. To fix it, {fix}."
        )


def expert_parallel(
    data=None, expert=1, model=1, devices=None, fsdp=False, auto_shard_dataset=True
):
    """One call to spread GLaM over devices: a `data x expert x model` mesh and its layouts.

    Each device holds `E / expert` experts of every MoE layer and `1 / model` of every attention
    and FFN weight; the batch is split over `data x expert` (routing groups follow the shards:
    `num_routing_groups=None` gives one group per batch shard). Build the model with
    `dispatch="einsum"` (GShard's dispatch, the `"auto"` choice on TPU): it partitions into one
    all-to-all each way, while the `"sort"` dispatch gathers every token to every device.
    Set the distribution before building the model:

    ```python
    distribution = keras_glam.distribution.expert_parallel(data=2, expert=4)
    keras.distribution.set_distribution(distribution)
    lm = keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e", dispatch="einsum")
    lm.fit(dataset)
    ```

    Args:
        data: int or None. Size of the pure data-parallel axis; None takes all devices not used
            by `expert x model`.
        expert: int. Devices experts are split over (must divide the number of experts).
        model: int. Tensor-parallel devices (must divide heads, FFN sizes and the padded
            vocabulary).
        devices: list of devices (`keras.distribution.list_devices()` names or JAX devices);
            None uses every device of every process. On TPU the mesh follows the physical
            topology (`jax.experimental.mesh_utils.create_device_mesh`), so the `model` and
            `expert` axes land on neighbouring chips.
        fsdp: also split the non-expert weights' model dimension over the expert axis (needed
            by the largest presets, see `keras_glam.distribution.plan`).
        auto_shard_dataset: let `fit` give each process its own rows of a `tf.data` batch.

    Returns:
        An `ExpertParallel` distribution (a `keras.distribution.ModelParallel`).
    """
    if keras.backend.backend() != "jax":
        raise RuntimeError(
            "keras.distribution supports only the JAX backend in Keras 3.15; set "
            "KERAS_BACKEND=jax before importing keras."
        )
    for name, value in (("expert", expert), ("model", model)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    device_list = list(devices) if devices is not None else None
    if device_list is None:
        num_devices = len(keras.distribution.list_devices())
    else:
        num_devices = len(device_list)
    if data is None:
        if num_devices % (expert * model):
            raise ValueError(
                f"expert={expert} x model={model} does not divide the {num_devices} devices; "
                "choose sizes whose product divides the device count."
            )
        data = num_devices // (expert * model)
    if not isinstance(data, int) or data < 1:
        raise ValueError(f"`data` must be a positive int or None, got {data!r}.")
    if data * expert * model != num_devices:
        raise ValueError(
            f"The mesh data={data} x expert={expert} x model={model} = "
            f"{data * expert * model} devices does not match the {num_devices} devices "
            "available. Pass sizes whose product is the device count (data=None infers it), or "
            "a `devices` list of that length."
        )
    shape = (data, expert, model)
    mesh = keras.distribution.DeviceMesh(shape, MESH_AXES, _mesh_devices(shape, device_list))
    return ExpertParallel(
        glam_layout_map(mesh, fsdp=fsdp),
        batch_axes=BATCH_AXES,
        auto_shard_dataset=auto_shard_dataset,
    )


def _mesh_devices(shape, devices):
    """Device names arranged as `shape`; the topology-aware order when no list is given."""
    if devices is not None:
        return devices
    from jax.experimental import mesh_utils

    ordered = mesh_utils.create_device_mesh(shape, allow_split_physical_axes=True)
    return [f"{device.platform}:{device.id}" for device in ordered.flat]

