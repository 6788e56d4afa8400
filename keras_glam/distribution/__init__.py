"""Data, expert and tensor parallelism for GLaM under `keras.distribution` (JAX backend).

- `expert_parallel(data=, expert=, model=)`: one call, a `data x expert x model` mesh and GLaM's
  layouts as an `ExpertParallel` distribution (a `keras.distribution.ModelParallel`).
- `glam_layout_map(mesh)` (also `GLaMBackbone.get_layout_map`): the `LayoutMap` alone, built
  from the model's layout rules (`keras_glam.models.layout_rules`, re-exported here).
- `plan(preset, mesh, batch_tokens=)`: per-device memory and traffic, without building the model
  (with `training_tokens=`, the run's bill and Chinchilla's compute-optimal size);
  `propose_mesh(num_devices, preset)`: a mesh that fits.
- `training_bill(preset, tokens, Hardware(...), mfu=)`: FLOPs, petaflop/s-days, chip-hours and
  energy of a run; `implied_mfu(...)` from a reported energy or duration; `compute_optimal_size`.
- `gather_to_host(model.weights)`: complete values on every process, to save from one.

See `docs/distributed.md` and `docs/compute.md`.
"""

from keras_glam.distribution.compute_bill import GLAM_TPU_V4
from keras_glam.distribution.compute_bill import ComputeOptimalSize
from keras_glam.distribution.compute_bill import Hardware
from keras_glam.distribution.compute_bill import TrainingBill
from keras_glam.distribution.compute_bill import compute_optimal_size
from keras_glam.distribution.compute_bill import implied_mfu
from keras_glam.distribution.compute_bill import training_bill
from keras_glam.distribution.expert_parallel import MESH_AXES
from keras_glam.distribution.expert_parallel import ExpertParallel
from keras_glam.distribution.expert_parallel import expert_parallel
from keras_glam.distribution.expert_parallel import num_batch_shards
from keras_glam.distribution.layout_map import unmatched_weights
from keras_glam.distribution.multihost import gather_to_host
from keras_glam.distribution.planner import DistributionPlan
from keras_glam.distribution.planner import parse_mesh_spec
from keras_glam.distribution.planner import mesh_distribution
from keras_glam.distribution.planner import plan
from keras_glam.distribution.planner import propose_mesh
from keras_glam.models.layout_rules import REPLICATED_WEIGHTS
from keras_glam.models.layout_rules import MultiAxisLayout
from keras_glam.models.layout_rules import glam_layout_map
from keras_glam.models.layout_rules import layout_rules

__all__ = [
    "GLAM_TPU_V4",
    "MESH_AXES",
    "ComputeOptimalSize",
    "DistributionPlan",
    "ExpertParallel",
    "Hardware",
    "MultiAxisLayout",
    "REPLICATED_WEIGHTS",
    "TrainingBill",
    "compute_optimal_size",
    "expert_parallel",
    "gather_to_host",
    "glam_layout_map",
    "implied_mfu",
    "num_batch_shards",
    "layout_rules",
    "parse_mesh_spec",
    "mesh_distribution",
    "plan",
    "propose_mesh",
    "training_bill",
    "unmatched_weights",
]
