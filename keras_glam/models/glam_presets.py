"""GLaM's named presets: the paper's 11 model sizes and small models for tests and CPU training.

No GLaM weights were ever published, so every preset is an *architecture*: `from_preset` builds
it with GLaM's random initialisation. The small presets also carry a 4096-piece SentencePiece
vocabulary trained on Python's documentation (`keras_glam/presets/pydoc_4k.spm`), so they can be
trained and sampled from offline; the paper-size presets count a 32,000-entry vocabulary (the
size the paper's parameter table implies) and ship no tokenizer.
"""

# Shared by every row of the paper's table (GLAM.md): relative-bias buckets, zero logit, ReLU
# experts, top-2 routing, MoE on every other layer starting with layer 0.
_GLAM_DEFAULTS = {
    "top_k": 2,
    "capacity_factor": 2.0,
    "expert_activation": "relu",
    "use_zero_logit": True,
    "num_buckets": 32,
    "max_distance": 128,
}

PAPER_VOCABULARY_SIZE = 32000
SMALL_VOCABULARY_FILE = "pydoc_4k.spm"
SMALL_VOCABULARY_SIZE = 4096


def _config(vocabulary_size, num_layers, hidden_dim, intermediate_dim, num_heads, head_dim,
            num_experts):
    return {
        "vocabulary_size": vocabulary_size,
        "num_layers": num_layers,
        "hidden_dim": hidden_dim,
        "intermediate_dim": intermediate_dim,
        "num_heads": num_heads,
        "head_dim": head_dim,
        "num_experts": num_experts,
        **_GLAM_DEFAULTS,
    }


def _paper_row(num_layers, hidden_dim, intermediate_dim, num_heads, head_dim, num_experts, title):
    experts = f" with {num_experts} experts per MoE layer" if num_experts else ", dense"
    return {
        "config": _config(
            PAPER_VOCABULARY_SIZE, num_layers, hidden_dim, intermediate_dim, num_heads, head_dim,
            num_experts,
        ),
        "vocabulary": None,
        "description": (
            f"GLaM {title} from the paper's Table 4: {num_layers} layers, hidden "
            f"{hidden_dim}, FFN {intermediate_dim}, {num_heads} heads of {head_dim}{experts}. "
            "Architecture only: randomly initialised (no GLaM weights exist); 32K vocabulary, "
            "no tokenizer."
        ),
    }


def _small_row(num_layers, hidden_dim, intermediate_dim, num_heads, head_dim, num_experts, purpose):
    kind = f"MoE, {num_experts} experts on even layers" if num_experts else "dense"
    return {
        "config": _config(
            SMALL_VOCABULARY_SIZE, num_layers, hidden_dim, intermediate_dim, num_heads, head_dim,
            num_experts,
        ),
        "vocabulary": SMALL_VOCABULARY_FILE,
        "description": (
            f"Small GLaM ({kind}; {num_layers} layers, hidden {hidden_dim}) for {purpose}. "
            "Randomly initialised; 4096-piece SentencePiece vocabulary trained on Python's "
            "documentation."
        ),
    }


BACKBONE_PRESETS = {
    "glam_0.1b": _paper_row(12, 768, 3072, 12, 64, None, "0.1B"),
    "glam_0.1b_64e": _paper_row(12, 768, 3072, 12, 64, 64, "0.1B/64E"),
    "glam_1.7b": _paper_row(24, 2048, 8192, 16, 128, None, "1.7B"),
    "glam_1.7b_32e": _paper_row(24, 2048, 8192, 16, 128, 32, "1.7B/32E"),
    "glam_1.7b_64e": _paper_row(24, 2048, 8192, 16, 128, 64, "1.7B/64E"),
    "glam_1.7b_128e": _paper_row(24, 2048, 8192, 16, 128, 128, "1.7B/128E"),
    "glam_1.7b_256e": _paper_row(24, 2048, 8192, 16, 128, 256, "1.7B/256E"),
    "glam_8b": _paper_row(32, 4096, 16384, 32, 128, None, "8B"),
    "glam_8b_64e": _paper_row(32, 4096, 16384, 32, 128, 64, "8B/64E"),
    "glam_137b": _paper_row(64, 8192, 65536, 128, 128, None, "137B"),
    "glam_64b_64e": _paper_row(64, 8192, 32768, 128, 128, 64, "64B/64E"),
    "glam_tiny_dense": _small_row(2, 64, 128, 2, 32, None, "unit tests"),
    "glam_tiny_8e": _small_row(2, 64, 128, 2, 32, 8, "unit tests"),
    "glam_small_dense": _small_row(4, 256, 512, 4, 64, None, "CPU training (the MoE's dense twin)"),
    "glam_small_16e": _small_row(4, 256, 512, 4, 64, 16, "CPU training"),
}
