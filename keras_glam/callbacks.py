"""Keras callbacks of keras_glam's public API, in one place (as `keras.callbacks`).

- `HubCheckpoint`: training checkpoints pushed to the Hugging Face Hub while training
  (`keras_glam.hub.checkpoint_callback`).
- `TrainingProgress`, `ExpertLoadRecorder`: skipped steps, throughput, loss history and expert
  load in the logs (`keras_glam.training.callbacks`).
- `CheckpointObserver`: the base of callbacks that hear of every checkpoint a `Trainer` writes.
- `ComputeMeter`: achieved FLOP/s and MFU (`keras_glam.training.compute_meter`).
"""

from keras_glam.hub.checkpoint_callback import HubCheckpoint
from keras_glam.training.callbacks import CheckpointObserver
from keras_glam.training.callbacks import ExpertLoadRecorder
from keras_glam.training.callbacks import TrainingProgress
from keras_glam.training.compute_meter import ComputeMeter

__all__ = [
    "CheckpointObserver",
    "ComputeMeter",
    "ExpertLoadRecorder",
    "HubCheckpoint",
    "TrainingProgress",
]
