"""Training components: GLaM's recipe (optimizer, schedule, loss), fault tolerance, visibility."""

from keras_glam.training.adafactor import GLaMAdafactor
from keras_glam.training.callbacks import CheckpointObserver
from keras_glam.training.callbacks import ExpertLoadRecorder
from keras_glam.training.callbacks import TrainingProgress
from keras_glam.training.checkpointing import Checkpoint
from keras_glam.training.checkpointing import CheckpointManager
from keras_glam.training.checkpointing import CorruptCheckpointError
from keras_glam.training.losses import language_model_losses
from keras_glam.training.losses import routing_statistics
from keras_glam.training.plots import plot_training
from keras_glam.training.recipe import glam_learning_rate
from keras_glam.training.recipe import glam_optimizer
from keras_glam.training.schedules import GLaMLearningRateSchedule
from keras_glam.training.skip_nonfinite import SkipNonFiniteSteps
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
