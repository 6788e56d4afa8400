"""GatedGeluFeedForward: GLaM's dense GEGLU feed-forward network."""

import keras

_ACTIVATION_ALIASES = {
    # praxis `activations.GELU` defaults to `approximate=True`: the tanh form.
    "gelu_approximate": lambda x: keras.activations.gelu(x, approximate=True),
}


def _resolve_activation(activation):
    if not isinstance(activation, str):
        raise ValueError(
            f"`activation` must be a name (str) so the layer can be saved, got "
            f"{activation!r}. Use 'gelu_approximate' or a `keras.activations` name."
        )
    if activation in _ACTIVATION_ALIASES:
        return _ACTIVATION_ALIASES[activation]
    try:
        return keras.activations.get(activation)
    except ValueError as error:
        raise ValueError(
            f"Unknown activation {activation!r}. Use 'gelu_approximate' (GLaM's tanh "
            "GELU) or a name that `keras.activations.get` accepts."
        ) from error


@keras.saving.register_keras_serializable(package="keras_glam")
class GatedGeluFeedForward(keras.layers.Layer):
    """GLaM's dense feed-forward layer: `(act(x W0) * (x W1)) W2` (GEGLU).

    As configured by praxis `glam.GlamStackedTransformerHParams`
    (`TransformerFeedForward` with `use_gated_activation=True`, `activations.GELU`
    whose default is the tanh approximation, `has_bias=False`,
    `internal_gshard_variance_scaling_fan_in_init=True`): no biases, and every kernel is
    drawn from `U(-sqrt(3 / fan_in), sqrt(3 / fan_in))` (standard deviation
    `fan_in ** -0.5`), with fan_in = M for W0 and W1 and H for W2.

    Args:
        intermediate_dim: int. Hidden size H.
        activation: str. Activation of the gate branch: `"gelu_approximate"` (tanh GELU,
            GLaM's) or any name `keras.activations.get` accepts.
        **kwargs: Standard layer arguments (`name`, `dtype`, ...).

    Input shape: `[..., M]`. Output shape: `[..., M]` in the compute dtype.
    Sublayers (`Dense`, no bias): `ffn_gate` (W0, kernel `[M, H]`), `ffn_linear`
    (W1, `[M, H]`) and `ffn_output` (W2, `[H, M]`).

    Example:
    ```python
    ffn = keras_glam.layers.GatedGeluFeedForward(intermediate_dim=64)
    x = np.random.normal(size=(2, 5, 16)).astype("float32")
    y = ffn(x)  # [2, 5, 16]
    ```
    """

    def __init__(self, intermediate_dim, activation="gelu_approximate", **kwargs):
        super().__init__(**kwargs)
        if intermediate_dim < 1:
            raise ValueError(f"`intermediate_dim` must be >= 1, got {intermediate_dim}.")
        self.intermediate_dim = intermediate_dim
        self.activation = activation
        self._activation_fn = _resolve_activation(activation)

    def _dense(self, name, units, fan_in):
        limit = (3.0 / fan_in) ** 0.5
        return keras.layers.Dense(
            units,
            use_bias=False,
            kernel_initializer=keras.initializers.RandomUniform(-limit, limit),
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, input_shape):
        model_dim = input_shape[-1]
        if model_dim is None:
            raise ValueError(
                "GatedGeluFeedForward needs a known last input dimension, got "
                f"{input_shape}."
            )
        self.ffn_gate = self._dense("ffn_gate", self.intermediate_dim, model_dim)
        self.ffn_linear = self._dense("ffn_linear", self.intermediate_dim, model_dim)
        self.ffn_output = self._dense("ffn_output", model_dim, self.intermediate_dim)
        self.ffn_gate.build(input_shape)
        self.ffn_linear.build(input_shape)
        self.ffn_output.build(tuple(input_shape[:-1]) + (self.intermediate_dim,))
        self.built = True

    def call(self, x, training=None):
        """`training` is unused (GLaM trains without dropout); accepted for a uniform call."""
        hidden = self._activation_fn(self.ffn_gate(x)) * self.ffn_linear(x)
        return self.ffn_output(hidden)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {"intermediate_dim": self.intermediate_dim, "activation": self.activation}
        )
        return config
