"""One GLaM decoder layer: pre-norm attention, then a pre-norm dense or mixture-of-experts FFN."""

import keras

from keras_glam.layers.gated_gelu_feedforward import GatedGeluFeedForward
from keras_glam.layers.glam_attention import GLaMAttention
from keras_glam.layers.moe_feedforward import MoEFeedForward
from keras_glam.layers.rms_norm import RMSNorm


@keras.saving.register_keras_serializable(package="keras_glam")
class GLaMDecoderBlock(keras.layers.Layer):
    """A GLaM decoder layer: `h += Attn(RMSNorm(h))`, then `h += FFN(RMSNorm(h))`.

    The FFN is `MoEFeedForward` when `num_experts` is set, else the gated-GELU dense FFN.

    Args:
        num_heads: int. Attention heads N.
        head_dim: int. Size of each head Dh (`N * Dh` need not equal the hidden size).
        intermediate_dim: int. Hidden size H of the dense FFN and of each expert.
        num_experts: int or None. Experts E of the MoE FFN; None for a dense FFN.
        top_k: int. Experts per token.
        capacity_factor: float. GShard capacity factor used in training.
        eval_capacity_factor: float or None. Capacity factor outside training; None routes
            without dropping.
        num_routing_groups: int or None. Routing groups; None: one per batch shard.
        dispatch: str. MoE dispatch implementation (`"auto"`, `"einsum"`, `"sort"`, `"sort_loop"`).
        expert_activation: str. Activation of the two-matrix experts (ReLU in Google's code).
        aux_loss_weight: float. Weight of this layer's load-balancing loss.
        use_zero_logit: bool. Add GLaM's extra attention logit 0.0.
        num_buckets: int. Relative-position buckets.
        max_distance: int. Relative distance mapped to the last bucket.
        layer_norm_epsilon: float. RMSNorm epsilon.

    Example:
    ```python
    block = keras_glam.layers.GLaMDecoderBlock(
        num_heads=2, head_dim=8, intermediate_dim=32, num_experts=4)
    x = np.random.normal(size=(1, 5, 16)).astype("float32")
    mask = np.tril(np.ones((1, 5, 5), bool))
    y = block(x, attention_mask=mask)
    ```
    """

    def __init__(
        self,
        num_heads,
        head_dim,
        intermediate_dim,
        num_experts=None,
        top_k=2,
        capacity_factor=2.0,
        eval_capacity_factor=None,
        num_routing_groups=None,
        dispatch="auto",
        expert_activation="relu",
        aux_loss_weight=0.01,
        use_zero_logit=True,
        num_buckets=32,
        max_distance=128,
        layer_norm_epsilon=1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.intermediate_dim = intermediate_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.num_routing_groups = num_routing_groups
        self.dispatch = dispatch
        self.expert_activation = expert_activation
        self.aux_loss_weight = aux_loss_weight
        self.use_zero_logit = use_zero_logit
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.layer_norm_epsilon = layer_norm_epsilon

        self.attention_norm = RMSNorm(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="attention_norm"
        )
        self.attention = GLaMAttention(
            num_heads=num_heads,
            head_dim=head_dim,
            use_zero_logit=use_zero_logit,
            num_buckets=num_buckets,
            max_distance=max_distance,
            dtype=self.dtype_policy,
            name="attention",
        )
        self.feedforward_norm = RMSNorm(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="feedforward_norm"
        )
        if num_experts is None:
            self.feedforward = GatedGeluFeedForward(
                intermediate_dim, dtype=self.dtype_policy, name="ffn"
            )
        else:
            self.feedforward = MoEFeedForward(
                num_experts=num_experts,
                intermediate_dim=intermediate_dim,
                top_k=top_k,
                capacity_factor=capacity_factor,
                eval_capacity_factor=eval_capacity_factor,
                num_groups=num_routing_groups,
                dispatch=dispatch,
                activation=expert_activation,
                aux_loss_weight=aux_loss_weight,
                dtype=self.dtype_policy,
                name="moe",
            )

    @property
    def is_moe(self):
        return self.num_experts is not None

    def build(self, input_shape):
        self.attention_norm.build(input_shape)
        self.attention.build(input_shape)
        self.feedforward_norm.build(input_shape)
        self.feedforward.build(input_shape)
        self.built = True

    def call(
        self,
        x,
        attention_mask=None,
        padding_mask=None,
        cache=None,
        cache_update_index=None,
        training=None,
    ):
        """Apply the layer.

        Args:
            x: `[B, T, M]` hidden states.
            attention_mask: bool `[B, T, Tk]`, True where a query may attend to a key.
            padding_mask: `[B, T]`, zero at padding; padding is not routed to experts.
            cache: optional `(keys, values)` cache of this layer, two `[B, N, max_len, Dh]`
                arrays (see `GLaMAttention`).
            cache_update_index: position of `x[:, 0]` in the cache.

        Returns:
            `[B, T, M]`, or (`[B, T, M]`, updated cache) when `cache` is given.
        """
        attention_output = self.attention(
            self.attention_norm(x),
            attention_mask=attention_mask,
            cache=cache,
            cache_update_index=cache_update_index,
            training=training,
        )
        if cache is not None:
            attention_output, cache = attention_output
        x = x + attention_output
        normed = self.feedforward_norm(x)
        if self.is_moe:
            x = x + self.feedforward(normed, padding_mask=padding_mask, training=training)
        else:
            x = x + self.feedforward(normed, training=training)
        if cache is not None:
            return x, cache
        return x

    def compute_output_spec(
        self, x, attention_mask=None, cache=None, cache_update_index=None, **kwargs
    ):
        # The layer preserves shapes; saying so spares the MoE routing from being traced with
        # the unknown batch and sequence sizes of a functional model under construction.
        output = keras.KerasTensor(x.shape, dtype=self.compute_dtype)
        if cache is not None:
            _, cache = self.attention.compute_output_spec(
                x,
                attention_mask=attention_mask,
                cache=cache,
                cache_update_index=cache_update_index,
            )
            return output, cache
        return output

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "intermediate_dim": self.intermediate_dim,
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "num_routing_groups": self.num_routing_groups,
                "dispatch": self.dispatch,
                "expert_activation": self.expert_activation,
                "aux_loss_weight": self.aux_loss_weight,
                "use_zero_logit": self.use_zero_logit,
                "num_buckets": self.num_buckets,
                "max_distance": self.max_distance,
                "layer_norm_epsilon": self.layer_norm_epsilon,
            }
        )
        return config
