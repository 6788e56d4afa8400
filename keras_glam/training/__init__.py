"""Training components: GLaM's Adafactor and learning-rate schedule."""

from keras_glam.training.adafactor import GLaMAdafactor
from keras_glam.training.schedules import GLaMLearningRateSchedule

__all__ = ["GLaMAdafactor", "GLaMLearningRateSchedule"]
