"""GLaM as a causal language model: training with `fit`, cached XLA generation with `generate`."""

import inspect

import keras
import keras_hub
from keras import ops

from keras_glam.models.glam_backbone import GLaMBackbone
from keras_glam.models.glam_causal_lm_preprocessor import GLaMCausalLMPreprocessor
from keras_glam.models.input_checks import check_token_ids
from keras_glam.models.losses import Z_LOSS_WEIGHT
from keras_glam.models.losses import language_model_losses
from keras_glam.models.losses import routing_statistics
from keras_glam.models.presets import GLaMPresets
from keras_glam.optimizers.recipe import glam_optimizer
from keras_glam.optimizers.skip_nonfinite import SkipNonFiniteSteps

# Logit of the embedding rows added by `pad_vocabulary_to_multiple_of`. Finite, unlike -inf, so
# that one-hot cross-entropies (`0 * log_softmax`) stay free of NaN; its exp() is exactly 0.
_PADDED_LOGIT = -1e9

_BACKBONE_ARGUMENTS = set(inspect.signature(GLaMBackbone.__init__).parameters) - {"self", "kwargs"}


@keras.saving.register_keras_serializable(package="keras_glam")
class GLaMCausalLM(GLaMPresets, keras_hub.models.CausalLM):
    """An end-to-end GLaM model for causal language modelling.

    The output layer is the tied embedding: `logits = (h * M^-1/2) @ E^T`, computed in float32
    (GLaM's initialisation N(0, 1) of the embedding makes the `M^-1/2` scale part of the model).
    `generate()` uses a KV cache and XLA-compiled sampling loops; every KerasHub sampler
    applies (`compile(sampler="greedy" | "top_k" | "top_p" | "beam" | ...)`). Decoding routes
    tokens to experts without capacity drops, so cached decoding equals a full forward pass.
    With a padded vocabulary (`GLaMBackbone(pad_vocabulary_to_multiple_of=...)`) the logits have
    one entry per embedding row and the padding entries are -1e9.

    Args:
        backbone: a `GLaMBackbone`.
        preprocessor: a `GLaMCausalLMPreprocessor` or None (then inputs are token ids).

    Example:
    ```python
    lm = keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e")
    lm.compile(sampler="greedy")
    lm.generate("def main():", max_length=24)
    ```
    """

    backbone_cls = GLaMBackbone
    preprocessor_cls = GLaMCausalLMPreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        _check_vocabularies_match(backbone, preprocessor)
        self.backbone = backbone
        self.preprocessor = preprocessor
        inputs = backbone.input
        logits = self.output_logits(backbone(inputs))
        super().__init__(inputs=inputs, outputs=logits, **kwargs)

    def output_logits(self, hidden_states):
        """Float32 logits over the vocabulary of final hidden states (the backbone's output).

        The model's own output layer, for callers that need logits at a few positions only:
        running `backbone` and projecting just those positions' hidden states gives the same
        numbers as the full model at a fraction of the projection's cost (the projection is
        `M x V` multiply-adds per position).

        Args:
            hidden_states: `[..., M]` final hidden states, any leading shape.

        Returns:
            float32 `[..., V_padded]` logits (padding rows of the embedding at -1e9).

        Example:
        ```python
        lm = keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e", preprocessor=None)
        inputs = {"token_ids": np.array([[2, 40, 41, 42]]), "padding_mask": np.ones((1, 4))}
        last = lm.output_logits(lm.backbone(inputs)[:, -1])  # equals lm(inputs)[:, -1]
        ```
        """
        scale = self.backbone.hidden_dim**-0.5
        scaled = ops.multiply(ops.cast(hidden_states, "float32"), scale)
        logits = self.backbone.token_embedding(scaled, reverse=True)
        num_rows = logits.shape[-1]
        if num_rows == self.backbone.vocabulary_size:
            return logits
        # Padding rows of the embedding are no tokens: never sampled, no probability mass.
        is_token = ops.arange(num_rows) < self.backbone.vocabulary_size
        return ops.where(is_token, logits, _PADDED_LOGIT)

    def call_with_cache(self, token_ids, cache, cache_update_index, padding_mask=None):
        """One cached forward pass.

        Each query attends to the cache positions up to its own, and with `padding_mask` only
        to those that hold a real token of its row. That lets rows of different lengths share
        positions: left-padded prompts all end at the same position and decode in step, and a
        cache filled once with a context can be copied to several rows that continue it
        differently. GLaM has no absolute positions (its attention bias depends on
        `query_position - key_position` only), so a row shifted right by padding computes
        exactly what it computes unpadded.

        Args:
            token_ids: int `[B, T]`, the tokens at positions `cache_update_index + arange(T)`.
            cache: a tuple with one `(keys, values)` pair of `[B, N, max_len, Dh]` arrays per
                layer (`empty_cache` builds one). Separate arrays let each update be done in
                place in a compiled decoding loop.
            cache_update_index: int or scalar tensor, position of `token_ids[:, 0]`.
            padding_mask: optional bool `[B, max_len]` over the whole cache, False at slots
                that hold no token of the row (padding); None: every slot up to the query
                is attended (keras-hub's right-padded prompts, whose padding is overwritten
                before it is read). Padding queries are not routed to experts.

        Returns:
            `(logits [B, T, V], hidden_states [B, T, M], cache)`, the cache a tuple.
        """
        self._check_cache_arguments(cache, padding_mask)
        batch_size, query_length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        max_length = ops.shape(cache[0][0])[2]
        query_positions = cache_update_index + ops.arange(query_length)
        attention_mask = ops.expand_dims(
            ops.arange(max_length)[None, :] <= query_positions[:, None], 0
        )
        query_padding_mask = None
        if padding_mask is not None:
            padding_mask = ops.cast(padding_mask, "bool")
            attention_mask = ops.logical_and(attention_mask, padding_mask[:, None, :])
            query_padding_mask = ops.slice(
                padding_mask, [0, cache_update_index], [batch_size, query_length]
            )
        x = self.backbone.token_embedding(token_ids)
        updated = []
        for index, block in enumerate(self.backbone.transformer_layers):
            x, layer_cache = block(
                x,
                attention_mask=attention_mask,
                padding_mask=query_padding_mask,
                cache=cache[index],
                cache_update_index=cache_update_index,
            )
            updated.append(layer_cache)
        hidden_states = self.backbone.final_norm(x)
        return self.output_logits(hidden_states), hidden_states, tuple(updated)

    def _check_cache_arguments(self, cache, padding_mask):
        num_layers = self.backbone.num_layers
        if not (
            isinstance(cache, tuple)
            and len(cache) == num_layers
            and all(isinstance(pair, tuple) and len(pair) == 2 for pair in cache)
        ):
            found = type(cache).__name__
            if isinstance(cache, tuple):
                kinds = sorted({type(layer_cache).__name__ for layer_cache in cache})
                found = f"a tuple of {len(cache)} items of type {'/'.join(kinds)}"
            raise ValueError(
                f"`cache` must be a tuple of {num_layers} per-layer (keys, values) pairs of "
                f"`[B, num_heads, max_len, head_dim]` arrays, got {found}. Build it with "
                "`empty_cache(batch_size, max_len)`."
            )
        if padding_mask is None or None in padding_mask.shape:
            return
        expected = (cache[0][0].shape[0], cache[0][0].shape[2])
        if None not in expected and tuple(padding_mask.shape) != expected:
            raise ValueError(
                f"`padding_mask` must cover the whole cache, [batch, max_len] = "
                f"{list(expected)}, got shape {list(padding_mask.shape)}."
            )

    def empty_cache(self, batch_size, max_length):
        """A zero key/value cache for `call_with_cache`, in the compute dtype.

        Args:
            batch_size: int, rows.
            max_length: int, cache positions.

        Returns:
            A tuple of `num_layers` (keys, values) pairs of
            `[batch_size, num_heads, max_length, head_dim]` arrays.

        Example:
        ```python
        lm = keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e", preprocessor=None)
        cache = lm.empty_cache(1, 8)
        logits, _, cache = lm.call_with_cache(np.array([[2, 40, 41]]), cache, 0)
        ```
        """
        backbone = self.backbone
        shape = [batch_size, backbone.num_heads, max_length, backbone.head_dim]
        return tuple(
            tuple(ops.zeros(shape, dtype=self.compute_dtype) for _ in ("keys", "values"))
            for _ in range(backbone.num_layers)
        )

    def _build_cache(self, token_ids):
        """Run the prompt through the model, returning its hidden states and a filled cache."""
        batch_size, max_length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        cache = self.empty_cache(batch_size, max_length)
        _, hidden_states, cache = self.call_with_cache(token_ids, cache, 0)
        return hidden_states, cache

    def generate_step(self, inputs, stop_token_ids=None):
        """A compilable generation function for one batch of `token_ids`/`padding_mask`."""
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        hidden_states, cache = self._build_cache(token_ids)
        row_lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=-1)
        index = ops.min(row_lengths)

        def next(prompt, cache, index):
            cache_update_index = index - 1
            batch_size = ops.shape(prompt)[0]
            prompt = ops.slice(prompt, [0, cache_update_index], [batch_size, 1])
            logits, hidden_states, cache = self.call_with_cache(
                prompt, cache, cache_update_index
            )
            return ops.squeeze(logits, axis=1), ops.squeeze(hidden_states, axis=1), cache

        token_ids = self.sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden_states,
            model=self,
        )
        if stop_token_ids is None:
            padding_mask = ops.ones_like(token_ids, dtype="bool")
        else:
            # Keep everything up to and including the first stop token after the prompt.
            is_stop = ops.zeros_like(token_ids, dtype="bool")
            for stop_id in stop_token_ids:
                is_stop = ops.logical_or(is_stop, ops.equal(token_ids, stop_id))
            is_stop = ops.cast(ops.logical_and(is_stop, ops.logical_not(padding_mask)), "int32")
            stops_before = ops.cumsum(is_stop, axis=-1) - is_stop
            padding_mask = ops.equal(stops_before, 0)
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def generate(self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False):
        if self.preprocessor is None or isinstance(inputs, dict):
            batches = inputs if isinstance(inputs, list) else [inputs]
            for batch in batches:
                check_token_ids(batch, self.backbone.vocabulary_size)
        return super().generate(
            inputs, max_length=max_length, stop_token_ids=stop_token_ids, strip_prompt=strip_prompt
        )

    # Defaults until `compile` sets them, so `compute_loss` also works on an uncompiled model.
    z_loss_weight = Z_LOSS_WEIGHT
    _data_loss = None
    _routing_statistics_in_logs = False

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        sampler="top_k",
        z_loss_weight=Z_LOSS_WEIGHT,
        skip_nonfinite_steps=True,
        **kwargs,
    ):
        """Configure training with GLaM's recipe, every part overridable, and generation.

        With no arguments this is GLaM's recipe (`keras_glam.optimizers.recipe`,
        `keras_glam.models.losses`): `GLaMAdafactor` on `rsqrt(max(step, 10000))`, loss = mean
        token cross-entropy (float32, over tokens with `sample_weight > 0`) +
        `1e-4 * mean(logsumexp(logits)^2)` + the MoE layers' load-balance losses (`0.01 * aux` per
        MoE layer, set by the backbone's `aux_loss_weight`), and every step whose gradients are
        NaN/Inf skipped with weights and optimizer state unchanged.

        Besides `loss` (the total) the logs carry its three terms, which add up to it:
        `cross_entropy`, `z_loss` (already multiplied by `z_loss_weight`) and `aux_loss`. Their
        running means weigh each batch by its target tokens (`sum(sample_weight)`), so an
        evaluation's `cross_entropy` is the mean over every held-out token (Keras' own `loss`
        weighs batches by their rows), and steps with a non-finite value leave them untouched
        (`loss` then shows NaN until the epoch ends). Training logs of an MoE model
        also carry `dropped_top1`, `dropped_top2` (fraction of tokens whose first/second choice
        exceeded capacity) and `expert_load_cv` (coefficient of variation of the tokens routed
        per expert), averaged over MoE layers (`keras_glam.models.losses.routing_statistics`);
        evaluation logs none (MoE layers record routing statistics on training calls only).

        Args:
            optimizer: `"auto"` (GLaM's `GLaMAdafactor` and schedule, see
                `keras_glam.optimizers.recipe.glam_optimizer`), an optimizer name or instance.
            loss: `"auto"` (GLaM's token cross-entropy), or a Keras loss that replaces the
                cross-entropy term; the z-loss and the aux losses are added to it either way.
            weighted_metrics: `"auto"` (token accuracy, weighted by `sample_weight`) or a list.
            sampler: the KerasHub sampler `generate()` uses (`"top_k"`, `"greedy"`, ...).
            z_loss_weight: float. Weight of the output z-loss (GLaM: 1e-4; 0 disables it).
            skip_nonfinite_steps: bool. Wrap the optimizer in `SkipNonFiniteSteps` (GLaM: on).
            **kwargs: other `keras.Model.compile` arguments (`jit_compile`, `metrics`, ...).
        """
        if optimizer == "auto":
            optimizer = glam_optimizer()
        optimizer = keras.optimizers.get(optimizer)
        if skip_nonfinite_steps and not isinstance(optimizer, SkipNonFiniteSteps):
            optimizer = SkipNonFiniteSteps(optimizer)
        if weighted_metrics == "auto":
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        self.z_loss_weight = z_loss_weight
        self._data_loss = None if loss == "auto" else keras.losses.get(loss)
        # The loss is computed in `compute_loss`; Keras' own compiled loss stays unused.
        super().compile(
            optimizer=optimizer,
            loss=None,
            weighted_metrics=weighted_metrics,
            sampler=sampler,
            **kwargs,
        )
        # Created once: Keras tracks every metric ever assigned, so recompiling must reuse them.
        if not hasattr(self, "_loss_term_trackers"):
            self._loss_term_trackers = {
                name: keras.metrics.Mean(name=name)
                for name in ("cross_entropy", "z_loss", "aux_loss")
            }
            routing_names = []
            if self.backbone.moe_layers:
                routing_names = [f"dropped_top{k + 1}" for k in range(self.backbone.top_k)]
                routing_names.append("expert_load_cv")
            self._routing_trackers = {name: keras.metrics.Mean(name=name) for name in routing_names}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """GLaM's loss: data term + `z_loss_weight` * output z-loss + the model's aux losses.

        Args:
            x: the inputs (unused).
            y: int `[B, L]` target token ids.
            y_pred: float `[B, L, V]` logits.
            sample_weight: `[B, L]`, 0 where a position has no target.
            training: whether this is a training step (routing statistics are logged only then).

        Returns:
            float32 scalar, the total loss.
        """
        del x
        losses = language_model_losses(y, y_pred, sample_weight)
        data_loss = losses.cross_entropy
        if self._data_loss is not None:
            data_loss = ops.cast(self._data_loss(y, y_pred, sample_weight), "float32")
        z_loss = self.z_loss_weight * losses.z_loss
        aux_loss = ops.zeros((), "float32")
        for layer_loss in self.losses:
            aux_loss = aux_loss + ops.cast(ops.sum(layer_loss), "float32")
        total = data_loss + z_loss + aux_loss

        if not hasattr(self, "_loss_term_trackers"):  # Not compiled: nothing to log.
            return total
        trackers = {**self._loss_term_trackers, **self._routing_trackers}
        values = {"cross_entropy": data_loss, "z_loss": z_loss, "aux_loss": aux_loss}
        if training and self._routing_trackers:
            values.update(routing_statistics(self.backbone.moe_layers))
        # Weighted by the batch's target tokens, so that an epoch's value is the mean over all
        # its tokens (batches may differ in real tokens: the last held-out batch, padding).
        if sample_weight is None:
            tokens = ops.cast(ops.size(y), "float32")
        else:
            tokens = ops.sum(ops.cast(sample_weight, "float32"))
        for name, value in values.items():
            usable = ops.logical_and(ops.isfinite(value), ops.isfinite(tokens))
            trackers[name].update_state(
                ops.where(usable, value, 0.0), sample_weight=ops.where(usable, tokens, 0.0)
            )
        # Read by `get_metrics_result`, which Keras calls after `compute_loss` in every
        # train and test step, while tracing the same step function.
        self._routing_statistics_in_logs = bool(training and self._routing_trackers)
        return total

    def get_metrics_result(self):
        """The logged metrics; routing statistics only after a training step (see `compile`)."""
        results = super().get_metrics_result()
        if not self._routing_statistics_in_logs:
            for name in getattr(self, "_routing_trackers", {}):
                results.pop(name, None)
        return results

    @classmethod
    def from_preset(cls, preset, load_weights=True, revision=None, **kwargs):
        """Build a GLaM causal LM from a builtin preset name, a directory or an `hf://` handle.

        Builtin presets are architectures with random initialisation (no GLaM weights exist);
        small ones come with their tokenizer, paper-size ones with `preprocessor=None` unless
        one is passed. Backbone arguments (`dtype`, `capacity_factor`, ...) and preprocessor
        arguments (`sequence_length`) may be given as keyword arguments.
        """
        backbone_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _BACKBONE_ARGUMENTS}
        preprocessor_kwargs = {
            k: kwargs.pop(k) for k in ("sequence_length", "add_start_token", "add_end_token")
            if k in kwargs
        }
        if backbone_kwargs:
            kwargs["backbone"] = GLaMBackbone.from_preset(
                preset, load_weights, revision=revision, **backbone_kwargs
            )
            load_weights = False  # The backbone holds every weight of a GLaMCausalLM.
        if preprocessor_kwargs and "preprocessor" not in kwargs:
            kwargs["preprocessor"] = GLaMCausalLMPreprocessor.from_preset(
                preset, revision=revision, **preprocessor_kwargs
            )
        return super().from_preset(preset, load_weights, revision=revision, **kwargs)


def _check_vocabularies_match(backbone, preprocessor):
    tokenizer = getattr(preprocessor, "tokenizer", None)
    # While keras-hub loads a preset, the task is built before the vocabulary is read: nothing
    # to compare yet (a saved preset's parts were saved together).
    if tokenizer is None or getattr(tokenizer, "proto", None) is None:
        return
    size = tokenizer.vocabulary_size()
    if size != backbone.vocabulary_size:
        raise ValueError(
            f"The tokenizer has {size} tokens but the backbone's vocabulary_size is "
            f"{backbone.vocabulary_size}: token ids and embedding rows would not correspond. "
            "Use the tokenizer the model was trained with, or build the backbone with "
            f"vocabulary_size={size}."
        )
