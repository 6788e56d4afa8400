"""GLaMAttention: multi-head self-attention with GLaM's initialisation, zero logit and bias."""

import keras
from keras import ops

from keras_glam.layers.relative_bias import RelativeBias

# Finite, so that a query with every key masked yields zeros (zero logit) or a uniform
# average (no zero logit) instead of NaN.
_MASKED_LOGIT = -1e9


@keras.saving.register_keras_serializable(package="keras_glam")
class GLaMAttention(keras.layers.Layer):
    """GLaM's multi-head self-attention, with an optional key/value cache for decoding.

    As configured by praxis `glam.GlamStackedTransformerHParams` (`DotProductAttention`
    with `internal_gshard_gaussian_init=True`, `internal_enable_query_scale=False`,
    `use_bias=False`, `attention_extra_logit=0.0`, a `RelativeBias`):
    - no biases; `num_heads * head_dim` is independent of the model dimension M;
    - no `1 / sqrt(head_dim)` query scaling: the initialisation carries it, with normal
      kernels of standard deviation `(M * Dh) ** -0.5` for the query, `M ** -0.5` for the
      key and value and `(N * Dh) ** -0.5` for the output (praxis passes these values to
      `WeightInit.Gaussian`, whose argument is the standard deviation);
    - logits `q . k + relative_bias` and the softmax in float32 (also under
      `mixed_bfloat16`); the attention weights are cast back to the compute dtype before
      they weight the values, as in praxis;
    - an extra logit 0.0 in the softmax (a null key whose value is zero), so the weights
      of a row sum to less than one.

    Args:
        num_heads: int. Attention heads N.
        head_dim: int. Size Dh of each head.
        hidden_dim: int or None. Model dimension M; taken from the input when None, and
            checked against it otherwise.
        use_zero_logit: bool. Add the extra logit 0.0 to the softmax (GLaM: True).
        relative_bias: bool. Add the learned relative position bias (GLaM: True).
        num_buckets: int. Relative position buckets.
        max_distance: int. Relative distance mapped to the last bucket.
        **kwargs: Standard layer arguments (`name`, `dtype`, ...).

    Call arguments:
        x: `[B, T, M]` hidden states.
        attention_mask: bool `[B, T, Tk]`, True where a query may attend to a key, or None
            to attend everywhere (only without a cache). The caller builds it: causal and
            same-segment in training; `key_position <= query_position` over the whole
            cache (`Tk = max_len`) in cached decoding, and False at padding keys of rows
            that are left-padded (the relative bias depends on `query_position -
            key_position` only, so a shifted row attends exactly as an unshifted one).
        cache: a `(keys, values)` pair of `[B, N, max_len, Dh]` arrays, or None. Heads
            come before positions and keys and values are separate arrays, so that the
            attention's contractions read the cache as it lies (no per-step copy or
            transpose of the whole cache).
        cache_update_index: int or int scalar tensor (may be traced); required with
            `cache`. This step's keys and values are written at `cache_update_index`,
            the position of `x[:, 0]` (one update of the cache, done in place inside a
            compiled loop), and the queries attend over the whole cache.
        training: unused (GLaM trains without dropout); accepted for a uniform call.

    Returns:
        `[B, T, M]` in the compute dtype, or `(output, (keys, values))` when `cache` is
        given.

    Sublayers and weights: `query`, `key`, `value` (`EinsumDense`, kernel `[M, N, Dh]`),
    `attention_output` (kernel `[N, Dh, M]`) and `relative_bias` (`table` `[N, num_buckets]`);
    the names let `enable_lora` (layers named `query`/`value`) and `quantize("int8")` find them.

    Example:
    ```python
    attention = keras_glam.layers.GLaMAttention(num_heads=2, head_dim=8)
    x = np.random.normal(size=(1, 5, 16)).astype("float32")
    causal = np.tril(np.ones((1, 5, 5), bool))
    y = attention(x, attention_mask=causal)  # [1, 5, 16]
    cache = (np.zeros((1, 2, 5, 8), "float32"),) * 2  # keys, values: [B, N, max_len, Dh]
    step, cache = attention(
        x[:, :1], attention_mask=causal[:, :1], cache=cache, cache_update_index=0
    )  # step equals y[:, :1]
    ```
    """

    def __init__(
        self,
        num_heads,
        head_dim,
        hidden_dim=None,
        use_zero_logit=True,
        relative_bias=True,
        num_buckets=32,
        max_distance=128,
        name=None,
        **kwargs,
    ):
        # Keras would derive "g_la_m_attention" from the class name.
        if name is None:
            name = f"glam_attention_{keras.backend.get_uid('glam_attention')}"
        super().__init__(name=name, **kwargs)
        if num_heads < 1 or head_dim < 1:
            raise ValueError(
                f"`num_heads` and `head_dim` must be >= 1, got num_heads={num_heads}, "
                f"head_dim={head_dim}."
            )
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.hidden_dim = hidden_dim
        self.use_zero_logit = use_zero_logit
        self.use_relative_bias = relative_bias
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        if relative_bias:
            self.relative_bias = RelativeBias(
                num_heads=num_heads,
                num_buckets=num_buckets,
                max_distance=max_distance,
                dtype=self.dtype_policy,
                name="relative_bias",
            )

    def _projection(self, name, equation, output_shape, stddev):
        return keras.layers.EinsumDense(
            equation,
            output_shape=output_shape,
            kernel_initializer=keras.initializers.RandomNormal(stddev=stddev),
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, input_shape):
        model_dim = input_shape[-1]
        if model_dim is None:
            raise ValueError(
                f"GLaMAttention needs a known last input dimension, got {input_shape}."
            )
        if self.hidden_dim is not None and self.hidden_dim != model_dim:
            raise ValueError(
                f"`hidden_dim` is {self.hidden_dim} but the input's last dimension is "
                f"{model_dim}. Pass hidden_dim=None or the input's size."
            )
        heads_shape = (None, self.num_heads, self.head_dim)
        self.query = self._projection(
            "query", "btm,mnd->btnd", heads_shape, (model_dim * self.head_dim) ** -0.5
        )
        self.key = self._projection("key", "btm,mnd->btnd", heads_shape, model_dim**-0.5)
        self.value = self._projection(
            "value", "btm,mnd->btnd", heads_shape, model_dim**-0.5
        )
        self.attention_output = self._projection(
            "attention_output",
            "btnd,ndm->btm",
            (None, model_dim),
            (self.num_heads * self.head_dim) ** -0.5,
        )
        for projection in (self.query, self.key, self.value):
            projection.build(input_shape)
        self.attention_output.build(
            tuple(input_shape[:-1]) + (self.num_heads, self.head_dim)
        )
        if self.use_relative_bias:
            self.relative_bias.build()
        self.built = True

    def _check_call_arguments(self, x, attention_mask, cache, cache_update_index):
        if len(x.shape) != 3:
            raise ValueError(f"`x` must be [batch, length, hidden], got shape {x.shape}.")
        if attention_mask is not None and len(attention_mask.shape) != 3:
            raise ValueError(
                "`attention_mask` must be a bool [batch, query_length, key_length] "
                f"tensor, got shape {attention_mask.shape}."
            )
        if cache is None:
            return
        if cache_update_index is None:
            raise ValueError(
                "`cache_update_index` is required with `cache`: pass the cache position "
                "of x[:, 0]."
            )
        if attention_mask is None:
            raise ValueError(
                "Cached attention needs an `attention_mask` over the whole cache (True "
                "where key_position <= query_position); unwritten cache slots would "
                "otherwise be attended."
            )
        # A tuple, as `call` returns: a list would change the carry of a compiled loop.
        is_pair = (
            isinstance(cache, tuple)
            and len(cache) == 2
            and all(hasattr(array, "shape") for array in cache)
        )
        if not is_pair or any(
            len(array.shape) != 4
            or tuple(array.shape) != tuple(cache[0].shape)
            or array.shape[1] != self.num_heads
            or array.shape[3] != self.head_dim
            for array in cache
        ):
            raise ValueError(
                "`cache` must be a (keys, values) pair of [batch, num_heads, max_len, "
                f"head_dim] = [B, {self.num_heads}, max_len, {self.head_dim}] arrays, got "
                f"{_describe(cache)}."
            )

    def _attention_weights(self, logits):
        """Float32 softmax over the last axis, with the optional extra logit 0.0."""
        if not self.use_zero_logit:
            return ops.softmax(logits, axis=-1)
        # Shifting by max(row max, 0) keeps exp() finite; the shift cancels exactly, so it
        # carries no gradient.
        shift = ops.maximum(
            ops.stop_gradient(ops.max(logits, axis=-1, keepdims=True)), 0.0
        )
        exponentials = ops.exp(logits - shift)
        denominator = ops.sum(exponentials, axis=-1, keepdims=True) + ops.exp(-shift)
        return exponentials / denominator

    def call(
        self,
        x,
        attention_mask=None,
        cache=None,
        cache_update_index=None,
        training=None,
    ):
        self._check_call_arguments(x, attention_mask, cache, cache_update_index)
        query = self.query(x)
        key = self.key(x)
        value = self.value(x)
        query_offset = 0
        # Key and value axes: `s` positions, `n` heads, in the order they lie in memory.
        key_axes = "bsnd"
        if cache is not None:
            # Updates of this step's [B, N, T, Dh] entries, which XLA does in place in a
            # compiled decoding loop (one array holding both keys and values was copied
            # whole every step when sliced into them).
            key, value = (
                ops.slice_update(
                    array,
                    [0, 0, cache_update_index, 0],
                    ops.cast(ops.transpose(entries, (0, 2, 1, 3)), array.dtype),
                )
                for array, entries in zip(cache, (key, value))
            )
            cache = (key, value)
            key_axes = "bnsd"
            query_offset = cache_update_index

        logits = ops.einsum(
            f"btnd,{key_axes}->bnts", ops.cast(query, "float32"), ops.cast(key, "float32")
        )
        if self.use_relative_bias:
            logits = logits + self.relative_bias(
                ops.shape(query)[1], ops.shape(logits)[3], query_offset=query_offset
            )
        if attention_mask is not None:
            logits = ops.where(
                ops.cast(attention_mask, "bool")[:, None, :, :], logits, _MASKED_LOGIT
            )
        weights = ops.cast(self._attention_weights(logits), self.compute_dtype)
        attended = ops.einsum(
            f"bnts,{key_axes}->btnd", weights, ops.cast(value, self.compute_dtype)
        )
        output = self.attention_output(attended)
        if cache is not None:
            return output, cache
        return output

    def compute_output_spec(
        self, x, attention_mask=None, cache=None, cache_update_index=None, training=None
    ):
        self._check_call_arguments(x, attention_mask, cache, cache_update_index)
        output = keras.KerasTensor(x.shape, dtype=self.compute_dtype)
        if cache is not None:
            return output, tuple(
                keras.KerasTensor(array.shape, dtype=array.dtype) for array in cache
            )
        return output

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "hidden_dim": self.hidden_dim,
                "use_zero_logit": self.use_zero_logit,
                "relative_bias": self.use_relative_bias,
                "num_buckets": self.num_buckets,
                "max_distance": self.max_distance,
            }
        )
        return config


def _describe(cache):
    """A cache argument's type and shapes, for error messages."""
    if isinstance(cache, (tuple, list)):
        shapes = [list(getattr(array, "shape", ())) for array in cache]
        return f"a {type(cache).__name__} of shapes {shapes}"
    if hasattr(cache, "shape"):
        return f"one array of shape {list(cache.shape)}"
    return type(cache).__name__
