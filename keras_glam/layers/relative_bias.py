"""RelativeBias: GLaM's learned causal T5-style relative position bias, one table per layer."""

import keras
from keras import ops

from keras_glam.layers.independent_initializer import independent_initializer


def _check_bucket_arguments(num_buckets, max_distance):
    if num_buckets < 2:
        raise ValueError(
            f"`num_buckets` must be >= 2, got {num_buckets}. GLaM uses 32."
        )
    if max_distance <= num_buckets // 2:
        raise ValueError(
            f"`max_distance` ({max_distance}) must exceed the {num_buckets // 2} exact "
            f"buckets (`num_buckets // 2` for num_buckets={num_buckets}). GLaM uses "
            "num_buckets=32, max_distance=128."
        )


def relative_position_bucket(distance, num_buckets=32, max_distance=128):
    """Causal T5 bucket of a query-key distance.

    `n = max(distance, 0)`; the first `num_buckets // 2` buckets hold the distances
    `0 .. num_buckets // 2 - 1` exactly; larger distances are spread logarithmically over
    the other half up to `max_distance`, and everything beyond shares the last bucket:
    `min(num_buckets - 1, E + int(log(n / E) / log(max_distance / E) * (num_buckets - E)))`
    with `E = num_buckets // 2`. Computed in float32 and truncated to an integer, as
    praxis `RelativeBias._relative_position_bucket` does with `bidirectional=False`; for
    GLaM's 32 buckets and distance 128 the nearest float32 value to a bucket boundary is
    0.011 away (distance 76), so the float32 and the exact computation agree everywhere.
    (Lingvo's `gshard_builder` evaluates the formula in the activation dtype, bfloat16 in
    its GLaM-style configs, which moves distances 76 and 112 one bucket up.)

    Args:
        distance: int tensor (any shape) of `query_position - key_position`; negative
            values (keys in the future) fall in bucket 0.
        num_buckets: int. Number of buckets, >= 2.
        max_distance: int. Smallest distance that lands in the last bucket.

    Returns:
        int32 tensor of buckets in `[0, num_buckets)`, the shape of `distance`.

    Example:
    ```python
    from keras_glam.layers.relative_bias import relative_position_bucket

    buckets = relative_position_bucket(np.array([0, 15, 16, 19, 127, 128, 1000, -3]))
    # [0, 15, 16, 17, 31, 31, 31, 0]
    ```
    """
    _check_bucket_arguments(num_buckets, max_distance)
    distance = ops.maximum(ops.cast(distance, "int32"), 0)
    max_exact = num_buckets // 2
    # The log is taken of max(n, max_exact) so it stays finite where the exact branch wins.
    log_ratio = ops.log(
        ops.cast(ops.maximum(distance, max_exact), "float32") / max_exact
    ) / ops.log(ops.convert_to_tensor(max_distance / max_exact, "float32"))
    logarithmic_bucket = max_exact + ops.cast(
        log_ratio * (num_buckets - max_exact), "int32"
    )
    logarithmic_bucket = ops.minimum(logarithmic_bucket, num_buckets - 1)
    return ops.where(distance < max_exact, distance, logarithmic_bucket)


@keras.saving.register_keras_serializable(package="keras_glam")
class RelativeBias(keras.layers.Layer):
    """Learned causal relative position bias added to GLaM's attention logits.

    One `[num_heads, num_buckets]` table per attention layer (not shared across layers);
    the bias of query position `i` and key position `j` for head `h` is
    `table[h, relative_position_bucket(i - j)]`. Keys after the query share bucket 0
    (they are masked anyway in causal attention). The bias depends on `i - j` only, so one
    bias serves a batch whose rows are shifted by different amounts of left padding: each
    row's real tokens see the distances they would see unpadded.

    Args:
        num_heads: int. Attention heads N.
        num_buckets: int. Relative position buckets (GLaM: 32).
        max_distance: int. Distance mapped to the last bucket (GLaM: 128).
        initializer: initializer of the table, or None for GLaM's
            `N(0, stddev=(num_heads * num_buckets) ** -0.5)` (praxis `RelativeBias`,
            Lingvo `_RelativeAttentionBiasWeights`).
        **kwargs: Standard layer arguments (`name`, `dtype`, ...).

    Call arguments:
        query_length: int. Number of queries Tq.
        key_length: int. Number of keys Tk (positions `0 .. Tk - 1`).
        query_offset: int or int scalar tensor (may be traced). Position of the first
            query; queries sit at `query_offset + arange(Tq)`. In cached decoding it is
            the cache update index.

    Returns:
        float32 bias `[N, Tq, Tk]`.

    Weight: `table` `[N, num_buckets]`, kept and read in float32.

    Example:
    ```python
    bias_layer = keras_glam.layers.RelativeBias(num_heads=4)
    full = bias_layer(6, 6)  # [4, 6, 6]
    step = bias_layer(1, 6, query_offset=3)  # equals full[:, 3:4, :]
    ```
    """

    def __init__(
        self, num_heads, num_buckets=32, max_distance=128, initializer=None, **kwargs
    ):
        super().__init__(**kwargs)
        if num_heads < 1:
            raise ValueError(f"`num_heads` must be >= 1, got {num_heads}.")
        _check_bucket_arguments(num_buckets, max_distance)
        self.num_heads = num_heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.initializer = initializer
        # The call takes plain integers (lengths) positionally, not tensors.
        self._allow_non_tensor_positional_args = True

    def build(self, input_shape=None):
        if self.initializer is None:
            initializer = keras.initializers.RandomNormal(
                stddev=(self.num_heads * self.num_buckets) ** -0.5
            )
        else:
            initializer = independent_initializer(self.initializer, "table")
        # The bias is added to float32 logits, so the table is never autocast to bf16.
        self.table = self.add_weight(
            name="table",
            shape=(self.num_heads, self.num_buckets),
            initializer=initializer,
            autocast=False,
        )
        self.built = True

    def call(self, query_length, key_length, query_offset=0):
        query_positions = ops.arange(query_length, dtype="int32") + ops.cast(
            query_offset, "int32"
        )
        key_positions = ops.arange(key_length, dtype="int32")
        buckets = relative_position_bucket(
            query_positions[:, None] - key_positions[None, :],
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return ops.take(ops.cast(self.table, "float32"), buckets, axis=1)

    def compute_output_spec(self, query_length, key_length, query_offset=0):
        # Lengths are Python ints in every use; a traced one gives an unknown size.
        def static(length):
            return length if isinstance(length, int) else None

        return keras.KerasTensor(
            (self.num_heads, static(query_length), static(key_length)), dtype="float32"
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "num_buckets": self.num_buckets,
                "max_distance": self.max_distance,
                "initializer": (
                    None
                    if self.initializer is None
                    else keras.initializers.serialize(
                        keras.initializers.get(self.initializer)
                    )
                ),
            }
        )
        return config
