"""Training components: fault tolerance, checkpoints, visibility, and GLaM's recipe.

The optimizer recipe (`GLaMAdafactor`, `glam_optimizer`, ...) lives in `keras_glam.optimizers`
and the loss in `keras_glam.models.losses`; both are re-exported here, where a training script
looks for them.
"""

from keras_glam.models.losses import language_model_losses
from keras_glam.models.losses import routing_statistics
from keras_glam.optimizers import GLaMAdafactor
from keras_glam.optimizers import GLaMLearningRateSchedule
from keras_glam.optimizers import SkipNonFiniteSteps
from keras_glam.optimizers import glam_learning_rate
from keras_glam.optimizers import glam_optimizer
from keras_glam.training.callbacks import CheckpointObserver
from keras_glam.training.callbacks import ExpertLoadRecorder
from keras_glam.training.callbacks import TrainingProgress
from keras_glam.training.checkpointing import Checkpoint
from keras_glam.training.checkpointing import CheckpointManager
from keras_glam.training.checkpointing import CorruptCheckpointError
from keras_glam.training.plots import plot_training
from keras_glam.training.trainer import Trainer
from keras_glam.training.trainer import TrainingDivergedError
from keras_glam.training.trainer import TrainingState

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "CheckpointObserver",
    "CorruptCheckpointError",
    "ExpertLoadRecorder",
    "GLaMAdafactor",
    "GLaMLearningRateSchedule",
    "SkipNonFiniteSteps",
    "Trainer",
    "TrainingDivergedError",
    "TrainingProgress",
    "TrainingState",
    "glam_learning_rate",
    "glam_optimizer",
    "language_model_losses",
    "plot_training",
    "routing_statistics",
]
