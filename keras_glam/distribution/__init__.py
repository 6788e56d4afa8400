"""Data, expert and tensor parallelism for GLaM under `keras.distribution` (JAX backend).

- `expert_parallel(data=, expert=, model=)`: one call, a `data x expert x model` mesh and GLaM's
  layouts as an `ExpertParallel` distribution (a `keras.distribution.ModelParallel`).
- `glam_layout_map(mesh)` (also `GLaMBackbone.get_layout_map`): the `LayoutMap` alone.
- `plan(preset, mesh, batch_tokens=)`: per-device memory and traffic, without building the model;
  `propose_mesh(num_devices, preset)`: a mesh that fits.
- `gather_to_host(model.weights)`: complete values on every process, to save from one.

See `docs/distributed.md`.
"""

from keras_glam.distribution.expert_parallel import MESH_AXES
from keras_glam.distribution.expert_parallel import ExpertParallel
from keras_glam.distribution.expert_parallel import expert_parallel
from keras_glam.distribution.layout_map import REPLICATED_WEIGHTS
from keras_glam.distribution.layout_map import MultiAxisLayout
from keras_glam.distribution.layout_map import glam_layout_map
from keras_glam.distribution.layout_map import layout_rules
from keras_glam.distribution.layout_map import unmatched_weights
from keras_glam.distribution.multihost import gather_to_host
from keras_glam.distribution.planner import DistributionPlan
from keras_glam.distribution.planner import glam_weight_shapes
from keras_glam.distribution.planner import plan
from keras_glam.distribution.planner import propose_mesh

__all__ = [
    "MESH_AXES",
    "DistributionPlan",
    "ExpertParallel",
    "MultiAxisLayout",
    "REPLICATED_WEIGHTS",
    "expert_parallel",
    "gather_to_host",
    "glam_layout_map",
    "glam_weight_shapes",
    "layout_rules",
    "plan",
    "propose_mesh",
    "unmatched_weights",
]
