"""The GLaM decoder-only backbone."""

import keras
import keras_hub
from keras import ops

from keras_glam.layers.glam_decoder_block import GLaMDecoderBlock
from keras_glam.layers.rms_norm import RMSNorm
from keras_glam.models.architecture import is_moe_layer
from keras_glam.models.architecture import padded_vocabulary_size
from keras_glam.models.input_checks import check_token_ids
from keras_glam.models.layout_rules import glam_layout_map
from keras_glam.models.losses import AUX_LOSS_WEIGHT
from keras_glam.models.memory_check import check_fits_in_memory
from keras_glam.models.presets import GLaMPresets


def attention_mask_from_segments(padding_mask):
    """Causal, same-document attention mask `[B, L, L]` from `padding_mask` `[B, L]`.

    `padding_mask` is 0 at padding and a positive segment id elsewhere (a boolean mask is the
    one-document case), so packed rows never attend across a document boundary.
    """
    segments = ops.cast(padding_mask, "int32")
    # Positions from a cumulative sum rather than `arange(L)`: L is unknown while the
    # functional model is built.
    positions = ops.cumsum(ops.ones_like(segments), axis=1)
    causal = ops.greater_equal(positions[:, :, None], positions[:, None, :])
    same_segment = ops.equal(segments[:, :, None], segments[:, None, :])
    real_key = ops.not_equal(segments[:, None, :], 0)
    return ops.logical_and(causal, ops.logical_and(same_segment, real_key))


@keras.saving.register_keras_serializable(package="keras_glam")
class GLaMBackbone(GLaMPresets, keras_hub.models.Backbone):
    """GLaM: a decoder-only Transformer whose every other FFN is a top-2 mixture of experts.

    Pre-norm layers (`h += Attn(RMSNorm(h))`, `h += FFN(RMSNorm(h))`), a final RMSNorm, T5-style
    causal relative position biases, no biases anywhere, a tied `[V, M]` embedding initialised
    N(0, 1). Layers 0, 2, 4, ... hold `MoEFeedForward` (ReLU experts, GShard top-2 routing); the
    others the gated-GELU dense FFN. With `num_experts=None` every layer is dense.

    Inputs are `token_ids` `[B, L]` and `padding_mask` `[B, L]`; `padding_mask` is 0 at padding
    and may carry positive per-document segment ids for packed rows. The output is the final
    hidden state `[B, L, M]`.

    Args:
        vocabulary_size: int. Size of the token vocabulary V.
        num_layers: int. Decoder layers L.
        hidden_dim: int. Model dimension M.
        intermediate_dim: int. Hidden size H of the dense FFN and of each expert.
        num_heads: int. Attention heads N.
        head_dim: int. Size of each head Dh (`N * Dh` is independent of M).
        num_experts: int or None. Experts E per MoE layer; None for a dense model.
        moe_layer_interval: int. MoE on layers 0, interval, 2*interval, ... (GLaM: 2).
        top_k: int. Experts per token (GLaM: 2).
        capacity_factor: float. GShard capacity factor in training (both choices counted).
        eval_capacity_factor: float or None. Capacity outside training; None never drops.
        num_routing_groups: int or None. Routing groups; None: one per batch shard.
        dispatch: str. `"auto"`, `"einsum"` (GShard one-hot einsums), `"sort"` (gather) or
            `"sort_loop"` (gather, then a loop over experts on their filled rows: CPU).
        expert_activation: str. Expert activation (ReLU in Google's GLaM code).
        aux_loss_weight: float. Load-balancing loss weight per MoE layer (0.01).
        use_zero_logit: bool. GLaM's extra attention logit 0.0.
        num_buckets: int. Relative position buckets (32).
        max_distance: int. Relative distance of the last bucket (128).
        layer_norm_epsilon: float. RMSNorm epsilon (1e-6).
        pad_vocabulary_to_multiple_of: int. The embedding gets `vocabulary_size` rounded up to a
            multiple of this many rows, so that a tensor-parallel mesh axis can split it
            (`keras_glam.distribution`); logits of the extra rows are masked. 1: no padding.
        dtype: dtype policy of the model (`"mixed_bfloat16"` keeps GLaM's float32 parts).

    Example:
    ```python
    backbone = keras_glam.GLaMBackbone(
        vocabulary_size=1000, num_layers=2, hidden_dim=64, intermediate_dim=128,
        num_heads=2, head_dim=32, num_experts=8)
    hidden = backbone({"token_ids": np.array([[5, 6, 7]]),
                       "padding_mask": np.array([[1, 1, 1]])})
    ```
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        hidden_dim,
        intermediate_dim,
        num_heads,
        head_dim,
        num_experts=None,
        moe_layer_interval=2,
        top_k=2,
        capacity_factor=2.0,
        eval_capacity_factor=None,
        num_routing_groups=None,
        dispatch="auto",
        expert_activation="relu",
        aux_loss_weight=AUX_LOSS_WEIGHT,
        use_zero_logit=True,
        num_buckets=32,
        max_distance=128,
        layer_norm_epsilon=1e-6,
        pad_vocabulary_to_multiple_of=1,
        dtype=None,
        **kwargs,
    ):
        if not isinstance(pad_vocabulary_to_multiple_of, int) or pad_vocabulary_to_multiple_of < 1:
            raise ValueError(
                "`pad_vocabulary_to_multiple_of` must be a positive int (1: no padding), got "
                f"{pad_vocabulary_to_multiple_of!r}."
            )
        config = {
            "vocabulary_size": vocabulary_size,
            "num_layers": num_layers,
            "hidden_dim": hidden_dim,
            "intermediate_dim": intermediate_dim,
            "num_heads": num_heads,
            "head_dim": head_dim,
            "num_experts": num_experts,
            "moe_layer_interval": moe_layer_interval,
            "top_k": top_k,
            "capacity_factor": capacity_factor,
            "eval_capacity_factor": eval_capacity_factor,
            "num_routing_groups": num_routing_groups,
            "dispatch": dispatch,
            "expert_activation": expert_activation,
            "aux_loss_weight": aux_loss_weight,
            "use_zero_logit": use_zero_logit,
            "num_buckets": num_buckets,
            "max_distance": max_distance,
            "layer_norm_epsilon": layer_norm_epsilon,
            "pad_vocabulary_to_multiple_of": pad_vocabulary_to_multiple_of,
        }
        policy = keras.dtype_policies.get(dtype) if dtype is not None else None
        check_fits_in_memory(
            config, (policy or keras.config.dtype_policy()).variable_dtype
        )

        # === Layers ===
        self.token_embedding = keras_hub.layers.ReversibleEmbedding(
            input_dim=padded_vocabulary_size(vocabulary_size, pad_vocabulary_to_multiple_of),
            output_dim=hidden_dim,
            tie_weights=True,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0),
            reverse_dtype="float32",
            dtype=dtype,
            name="token_embedding",
        )
        self.transformer_layers = [
            GLaMDecoderBlock(
                num_heads=num_heads,
                head_dim=head_dim,
                intermediate_dim=intermediate_dim,
                num_experts=(
                    num_experts
                    if is_moe_layer(index, num_experts, moe_layer_interval)
                    else None
                ),
                top_k=top_k,
                capacity_factor=capacity_factor,
                eval_capacity_factor=eval_capacity_factor,
                num_routing_groups=num_routing_groups,
                dispatch=dispatch,
                expert_activation=expert_activation,
                aux_loss_weight=aux_loss_weight,
                use_zero_logit=use_zero_logit,
                num_buckets=num_buckets,
                max_distance=max_distance,
                layer_norm_epsilon=layer_norm_epsilon,
                dtype=dtype,
                name=f"decoder_block_{index}",
            )
            for index in range(num_layers)
        ]
        self.final_norm = RMSNorm(epsilon=layer_norm_epsilon, dtype=dtype, name="final_norm")

        # === Functional Model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        attention_mask = attention_mask_from_segments(padding_mask)
        x = self.token_embedding(token_ids)
        for block in self.transformer_layers:
            x = block(x, attention_mask=attention_mask, padding_mask=padding_mask)
        sequence_output = self.final_norm(x)
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=sequence_output,
            dtype=dtype,
            name=kwargs.pop("name", "glam_backbone"),
            **kwargs,
        )

        # === Config ===
        self._glam_config = config
        for key, value in config.items():
            setattr(self, key, value)

    @property
    def moe_layers(self):
        """The `MoEFeedForward` layers, in depth order."""
        return [block.feedforward for block in self.transformer_layers if block.is_moe]

    @staticmethod
    def get_layout_map(
        device_mesh, data_axis="data", expert_axis="expert", model_axis="model", fsdp=False
    ):
        """A `keras.distribution.LayoutMap` for GLaM: expert, tensor and data parallelism.

        Expert kernels `[E, M, H]` / `[E, H, M]` are split over `expert_axis` on `E` (and over
        `model_axis` on `H`); attention heads, the dense FFN's `H` and the vocabulary over
        `model_axis`; the router and the norms are replicated (the allow-list
        `keras_glam.models.layout_rules.REPLICATED_WEIGHTS`). The MoE dispatched activations
        `[E, G, C, M]` get a layout under `{moe_layer.path}/expert_inputs`, which makes XLA move
        tokens to their experts by all-to-all. Axes missing from the mesh count as size 1. A
        vocabulary split over `model_axis` must divide it: build the backbone with
        `pad_vocabulary_to_multiple_of`. The batch is split over `data x expert` by
        `keras_glam.distribution.ExpertParallel` (plain `ModelParallel` splits it over one axis).

        Args:
            device_mesh: a `keras.distribution.DeviceMesh`.
            data_axis: name of the pure data-parallel mesh axis.
            expert_axis: name of the mesh axis experts (and the batch) are split over.
            model_axis: name of the tensor-parallel mesh axis.
            fsdp: also split the non-expert weights' model dimension over `expert_axis`.

        Returns:
            A `keras.distribution.LayoutMap`.

        Example:
        ```python
        mesh = keras.distribution.DeviceMesh((2, 4, 1), ("data", "expert", "model"))
        layout_map = keras_glam.GLaMBackbone.get_layout_map(mesh)
        distribution = keras_glam.distribution.ExpertParallel(layout_map)
        with distribution.scope():
            backbone = keras_glam.GLaMBackbone.from_preset("glam_tiny_8e", dispatch="einsum")
        ```
        """
        return glam_layout_map(device_mesh, data_axis, expert_axis, model_axis, fsdp)

    def call(self, inputs, training=None, mask=None):
        check_token_ids(inputs, self.vocabulary_size)
        return super().call(inputs, training=training, mask=mask)

    def get_config(self):
        config = super().get_config()
        config.update(self._glam_config)
        return config
