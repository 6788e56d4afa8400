"""keras_glam.flops_per_token: against hand counts, the compiled model and the paper's rows."""

import jax
import numpy as np
import pytest

import keras_glam
from keras_glam.models.flops import GPT3_175B_CONFIG
from keras_glam.models.flops import flops_per_token
from keras_glam.models.flops import training_flops_per_token

# Two small configs, counted by hand below: every matmul of one row of S tokens, as
# (rows, contracted, columns) -> 2 * rows * contracted * columns FLOPs, divided by S.
DENSE = {
    "vocabulary_size": 50, "num_layers": 2, "hidden_dim": 8, "intermediate_dim": 16,
    "num_heads": 2, "head_dim": 4, "num_experts": None,
}
MOE = {**DENSE, "num_experts": 4, "top_k": 2}  # layer 0 MoE, layer 1 dense
S = 6


def _matmul_flops(shapes):
    return sum(2 * rows * inner * columns for rows, inner, columns in shapes)


def _attention_by_hand(causal):
    # q, k, v: [S, 8] @ [8, 2*4]; output [S, 8] @ [8, 8].
    projections = [(S, 8, 8)] * 4
    # Per head (2 heads of 4): query i meets keys 0..i (causal) or all S keys; q.k and p.v.
    keys = sum(i + 1 for i in range(S)) if causal else S * S
    scores = [(keys, 4, 1)] * 2 * 2
    return projections, scores


def _hand_count(config, causal=True):
    parts = dict.fromkeys(
        ["attention_projections", "attention_scores", "dense_ffn", "routed_experts",
         "output_logits"],
        0,
    )
    for layer in range(2):
        projections, scores = _attention_by_hand(causal)
        parts["attention_projections"] += _matmul_flops(projections)
        parts["attention_scores"] += _matmul_flops(scores)
        if config["num_experts"] and layer == 0:
            # Router [S, 8] @ [8, 4]; each token through 2 experts: [8, 16] then [16, 8].
            parts["routed_experts"] += _matmul_flops([(S, 8, 4)] + [(2 * S, 8, 16), (2 * S, 16, 8)])
        else:
            # GEGLU: gate and linear [8, 16], output [16, 8].
            parts["dense_ffn"] += _matmul_flops([(S, 8, 16), (S, 8, 16), (S, 16, 8)])
    parts["output_logits"] = _matmul_flops([(S, 8, 50)])  # h @ E^T, E [50, 8]
    return {part: value / S for part, value in parts.items()}


@pytest.mark.parametrize("config", [DENSE, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_flops_equal_a_hand_count(config, causal):
    by_hand = _hand_count(config, causal)
    counted = flops_per_token(config, S, breakdown=True, causal=causal)
    assert counted == by_hand
    assert flops_per_token(config, S, causal=causal) == sum(by_hand.values())


def test_hand_counts_in_numbers():
    # Written out once, so a change in the conventions shows here first. Per token, S = 6:
    # projections 2 x 4 x (2*8*8) = 1024; causal scores 2 layers x 2 products x 2 x 8 x 3.5
    # keys = 224; GEGLU 3 x 2*8*16 = 768 per dense layer; MoE router 2*8*4 = 64 plus 2
    # experts x 2 x 2*8*16 = 1024; logits 2*8*50 = 800.
    assert flops_per_token(DENSE, S) == 1024 + 224 + 2 * 768 + 800
    assert flops_per_token(MOE, S) == 1024 + 224 + 768 + 64 + 1024 + 800
    assert training_flops_per_token(MOE, S) == 3 * (1024 + 224 + 768 + 64 + 1024 + 800)


def test_weight_flops_are_twice_the_activated_matmul_parameters(tiny_config):
    # Cross-check with count_params: what is not a matmul weight (norms, relative-bias tables)
    # is the whole difference.
    _, activated = keras_glam.count_params(tiny_config)
    L, M, N = 3, 16, 2
    not_matmul = L * (2 * M + N * 32) + M
    parts = flops_per_token(tiny_config, 64, breakdown=True)
    assert sum(parts.values()) - parts["attention_scores"] == 2 * (activated - not_matmul)


def test_dense_count_matches_the_compiled_forward_pass():
    # XLA's own FLOP count of the compiled forward pass (full attention matrix, masked) also
    # counts norms, softmax and GELU: a little above our matmul-only count with causal=False.
    config = {
        "vocabulary_size": 512, "num_layers": 2, "hidden_dim": 128, "intermediate_dim": 512,
        "num_heads": 4, "head_dim": 32, "num_experts": None,
    }
    lm = keras_glam.GLaMCausalLM(backbone=keras_glam.GLaMBackbone(**config), preprocessor=None)
    batch, length = 2, 64
    inputs = {"token_ids": np.ones((batch, length), "int32"),
              "padding_mask": np.ones((batch, length), "int32")}

    def forward(trainable, non_trainable, inputs):
        return lm.stateless_call(trainable, non_trainable, inputs)[0]

    values = ([v.value for v in lm.trainable_variables],
              [v.value for v in lm.non_trainable_variables])
    cost = jax.jit(forward).lower(*values, inputs).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    compiled = cost["flops"] / (batch * length)
    ours = flops_per_token(config, length, causal=False)
    assert ours < compiled < 1.03 * ours


def test_gpt3_175b_is_about_twice_its_parameters():
    # GPT-3's 350 GFLOPs per token is 2 x 175B. Its matmul weights: per layer 4 d^2 attention
    # and 2 x 4 d^2 FFN (plain, not GEGLU).
    d, layers = 12288, 96
    parts = flops_per_token(GPT3_175B_CONFIG, 2048, breakdown=True, dense_ffn="mlp")
    assert parts["attention_projections"] + parts["dense_ffn"] == 2 * layers * 12 * d**2
    assert parts["output_logits"] == 2 * 50257 * d
    total = sum(parts.values())
    assert 350e9 < total < 1.02 * 350e9


def test_glam_64b_64e_row():
    # docs/compute.md's numbers: 191.7 GFLOPs forward, 2 experts of 64 and the router.
    parts = flops_per_token("glam_64b_64e", breakdown=True)
    assert sum(parts.values()) == 191_685_984_256
    experts = 32 * (2 * 8192 * 64 + 2 * 2 * (2 * 8192 * 32768))
    assert parts["routed_experts"] == experts


def test_sequence_length_changes_only_the_attention_scores():
    short = flops_per_token(MOE, 8, breakdown=True)
    long = flops_per_token(MOE, 1024, breakdown=True)
    assert {k: v for k, v in short.items() if k != "attention_scores"} == {
        k: v for k, v in long.items() if k != "attention_scores"
    }
    # Causal: L * 2 * N * Dh * (S + 1).
    assert long["attention_scores"] - short["attention_scores"] == 2 * 2 * 8 * (1025 - 9)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="`sequence_length` must be a positive int"):
        flops_per_token(DENSE, 0)
    with pytest.raises(ValueError, match="`dense_ffn` must be one of geglu, mlp"):
        flops_per_token(DENSE, dense_ffn="swiglu")
    with pytest.raises(ValueError, match="Unknown preset 'glam_2b'"):
        flops_per_token("glam_2b")


def test_exported_at_the_top_level():
    assert keras_glam.flops_per_token is flops_per_token
