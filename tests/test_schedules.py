"""GLaMLearningRateSchedule: Lingvo's SqrtDecay, step counting, serialisation."""

import keras
import numpy as np
import pytest

from keras_glam.optimizers import GLaMAdafactor, GLaMLearningRateSchedule


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.01),
        (1, 0.01),
        (9999, 0.01),
        (10000, 0.01),
        (10001, 1 / np.sqrt(10001)),
        (40000, 0.005),
        (1_000_000, 0.001),
    ],
)
def test_glam_values(step, expected):
    assert float(GLaMLearningRateSchedule()(step)) == pytest.approx(expected, rel=1e-6)


def test_multiplier_offset_and_warmup():
    schedule = GLaMLearningRateSchedule(warmup_steps=100, multiplier=3.0, offset=50)
    assert float(schedule(0)) == pytest.approx(3.0 / 10.0)
    assert float(schedule(150)) == pytest.approx(3.0 / 10.0)
    assert float(schedule(450)) == pytest.approx(3.0 / 20.0)


def test_optimizer_counts_steps_from_zero():
    # Lingvo evaluates SqrtDecay at the global step, 0 during the first update; a Keras
    # optimizer evaluates its schedule at `iterations`, also 0 before the first update.
    schedule = GLaMLearningRateSchedule(warmup_steps=4)
    optimizer = GLaMAdafactor(learning_rate=schedule)
    variable = keras.Variable(np.ones((3,), "float32"))
    seen = []
    for _ in range(7):
        seen.append(float(optimizer.learning_rate))
        optimizer.apply([np.ones((3,), "float32")], [variable])
    expected = [0.5] * 5 + [1 / np.sqrt(5), 1 / np.sqrt(6)]
    np.testing.assert_allclose(seen, expected, rtol=1e-6)


def test_serialization_round_trip():
    schedule = GLaMLearningRateSchedule(warmup_steps=7, multiplier=0.5, offset=3)
    restored = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule)
    )
    assert isinstance(restored, GLaMLearningRateSchedule)
    assert restored.get_config() == {"warmup_steps": 7, "multiplier": 0.5, "offset": 3}
    assert float(restored(103)) == pytest.approx(0.05)


def test_rejects_non_positive_warmup():
    with pytest.raises(ValueError, match="warmup_steps"):
        GLaMLearningRateSchedule(warmup_steps=0)
