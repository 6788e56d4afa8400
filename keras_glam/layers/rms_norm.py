"""RMSNorm: GLaM's bias-free root-mean-square normalisation with a direct scale."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_glam")
class RMSNorm(keras.layers.Layer):
    """Root-mean-square normalisation: `x * rsqrt(mean(x^2) + epsilon) * scale`.

    GLaM's normalisation (praxis `RmsNorm` with `direct_scale=True`, Lingvo
    `gshard_builder._LN`): no mean subtraction, no bias, and the learned `scale` multiplies
    directly and starts at one (not `1 + scale` starting at zero). The mean square, the
    normalisation and the scaling run in float32 whatever the compute dtype; the result is
    cast to the compute dtype. Google's layer computes in the activation dtype; float32 is
    the more precise reading of the same formula and matches it exactly in float32.

    Args:
        epsilon: float. Added to the mean square before the reciprocal square root; >= 0.
        **kwargs: Standard layer arguments (`name`, `dtype`, ...).

    Input shape: `[..., M]`. Output shape: `[..., M]` in the compute dtype.
    Weight: `scale` `[M]`, ones at initialisation.

    Example:
    ```python
    norm = keras_glam.layers.RMSNorm(epsilon=1e-6)
    x = np.random.normal(size=(2, 5, 16)).astype("float32")
    y = norm(x)  # [2, 5, 16]; each row of y has a root mean square of ~1.
    ```
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        if epsilon < 0:
            raise ValueError(
                f"`epsilon` must be >= 0, got {epsilon}. Use a small positive value such "
                "as 1e-6 (GLaM's)."
            )
        self.epsilon = epsilon

    def build(self, input_shape):
        model_dim = input_shape[-1]
        if model_dim is None:
            raise ValueError(
                f"RMSNorm needs a known last dimension, got input shape {input_shape}. "
                "Give the input a static feature size."
            )
        # Read in float32 (no autocast) because the whole layer computes in float32.
        self.scale = self.add_weight(
            name="scale", shape=(model_dim,), initializer="ones", autocast=False
        )
        self.built = True

    def call(self, x):
        x = ops.cast(x, "float32")
        mean_square = ops.mean(ops.square(x), axis=-1, keepdims=True)
        normed = x * ops.rsqrt(mean_square + self.epsilon)
        return ops.cast(normed * ops.cast(self.scale, "float32"), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config
