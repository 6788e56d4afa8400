"""Throughput of keras_glam's lm-eval adapter (`GLaMLM`) against one request at a time.

    KERAS_BACKEND=jax python benchmarks/eval_throughput.py            # glam_small_16e
    KERAS_BACKEND=jax python benchmarks/eval_throughput.py --quick    # fewer requests

Requests are multiple-choice questions of real lengths built from Python's documentation: half
shaped like ARC (a 20-45-token question, 4 answers of 1-8 tokens), half like HellaSwag (a
40-90-token context, 4 endings of 15-40 tokens); every choice repeats its question's context,
as lm-eval's requests do. On `glam_small_16e` (random weights), the script measures:

1. `GLaMLM.loglikelihood` requests per second against one compiled forward pass per request,
   padded to one width (the longest request's), on the same requests. Target: at least 3x.
2. Its real (unpadded) tokens per second, counting each request's context once per request
   as lm-eval does, against the model's own forward throughput on full batches of 2048 tokens
   (8 x 256, the token budget of `GLaMLM`'s passes; every position a real token). Target: 60%.
   `GLaMLM` reads a context shared by several choices once, so this can exceed 100%; the
   script also prints the rate of the tokens it actually reads.
3. `GLaMLM.generate_until` generated tokens per second on 16 prompts against
   `GLaMCausalLM.generate` called one prompt at a time (greedy, same tokens: checked). Target 3x.

Everything is compiled and run once before timing; timed repetitions alternate between the two
sides of each comparison (the cores are shared), and the medians are compared.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

import keras_glam  # noqa: E402
from keras_glam.data.embedded_corpus import pydoc_documents  # noqa: E402
from keras_glam.evaluation import GLaMLM  # noqa: E402
from keras_glam.evaluation.token_scorer import padded_width  # noqa: E402

SHAPES = {  # (context tokens, choice tokens) ranges
    "arc": ((20, 45), (1, 8)),
    "hellaswag": ((40, 90), (15, 40)),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="glam_small_16e")
    parser.add_argument("--questions", type=int, default=64, help="questions (4 choices each)")
    parser.add_argument("--prompts", type=int, default=16, help="generate_until prompts")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="16 questions, 8 prompts, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.questions, args.prompts, args.repeats = 16, 8, 2
    return args


def text_pieces(tokenizer, rng, count, token_range):
    """`count` spans of Python's documentation, each about `token_range` tokens long."""
    words = " ".join(pydoc_documents()).split()
    pieces = []
    for _ in range(count):
        target = int(rng.integers(*token_range))
        start = int(rng.integers(0, len(words) - 200))
        length = max(1, target * 2 // 3)  # About 1.5 tokens per word in this vocabulary.
        piece = " ".join(words[start : start + length])
        while len(tokenizer.tokenize(piece)) > target and length > 1:
            length -= 1
            piece = " ".join(words[start : start + length])
        pieces.append(piece)
    return pieces


def multiple_choice_requests(tokenizer, questions, rng):
    requests = []
    for index in range(questions):
        context_range, choice_range = SHAPES["arc" if index % 2 == 0 else "hellaswag"]
        (context,) = text_pieces(tokenizer, rng, 1, context_range)
        for choice in text_pieces(tokenizer, rng, 4, choice_range):
            requests.append(Instance("loglikelihood", {}, (context + "\nAnswer:", " " + choice), 0))
    return requests


def load_average():
    """The 1, 5 and 15 minute load averages: the cores may be shared, and this says how much."""
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def alternate(first, second, repeats):
    """Median seconds of `first` and `second`, run alternately `repeats` times after a warm-up."""
    first(), second()
    times = ([], [])
    for _ in range(repeats):
        for side, function in enumerate((first, second)):
            times[side].append(timed(function)[0])
    return statistics.median(times[0]), statistics.median(times[1])


def forward_function(causal_lm):
    """One compiled forward pass returning the logits' argmax (the work, not a transfer)."""

    @jax.jit
    def forward(trainable, non_trainable, token_ids, padding_mask):
        logits, _ = causal_lm.stateless_call(
            trainable, non_trainable, {"token_ids": token_ids, "padding_mask": padding_mask}
        )
        return logits.astype("float32").max(-1)

    state = (
        [v.value for v in causal_lm.trainable_variables],
        [v.value for v in causal_lm.non_trainable_variables],
    )
    return lambda token_ids, mask: np.asarray(forward(*state, token_ids, mask))


def main():
    args = parse_args()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    causal_lm = keras_glam.GLaMCausalLM.from_preset(args.preset, sequence_length=args.max_length)
    causal_lm.compile(sampler="greedy")
    lm = GLaMLM(causal_lm, max_length=args.max_length)
    tokenizer = lm.glam_tokenizer
    print(
        f"{args.preset}, backend {keras.config.backend()}, {jax.device_count()} device(s), "
        f"load average {load_average()} on {os.cpu_count()} cores"
    )

    # 1 and 2: log-likelihoods.
    requests = multiple_choice_requests(tokenizer, args.questions, rng)
    # Contexts end without a space: the model reads `<s> + context + choice`, tokenized whole.
    inputs = [
        lm.tok_encode(context + choice)[:-1] for context, choice in (r.args for r in requests)
    ]
    real_tokens = sum(map(len, inputs))
    width = padded_width(max(map(len, inputs)), args.max_length)
    forward = forward_function(causal_lm)

    def one_per_request():
        for tokens in inputs:
            token_ids = np.zeros((1, width), "int32")
            token_ids[0, : len(tokens)] = tokens
            forward(token_ids, (token_ids != 0).astype("int32"))

    def batched():
        return lm.loglikelihood(requests, disable_tqdm=True)

    ours, baseline = alternate(batched, one_per_request, args.repeats)
    print(
        f"\nloglikelihood: {len(requests)} requests ({args.questions} questions x 4 choices), "
        f"{real_tokens:,} real tokens, lengths {min(map(len, inputs))}-{max(map(len, inputs))}"
    )
    print(
        f"  GLaMLM.loglikelihood          {ours * 1e3:8.1f} ms  {len(requests) / ours:8.1f} req/s"
    )
    print(
        f"  one padded pass per request   {baseline * 1e3:8.1f} ms  "
        f"{len(requests) / baseline:8.1f} req/s  (width {width})"
    )
    print(f"  speed-up: {baseline / ours:.2f}x (target >= 3x)")

    pass_width = min(256, args.max_length)
    rows = lm.scorer.rows_per_pass(pass_width)
    full = rng.integers(3, tokenizer.vocabulary_size(), (rows, pass_width)).astype("int32")
    passes = -(-real_tokens // (rows * pass_width))

    def full_batches():
        for _ in range(passes):
            forward(full, np.ones_like(full))

    ours, full_time = alternate(batched, full_batches, args.repeats)
    model_rate = passes * rows * pass_width / full_time
    print(
        f"  real tokens/s {real_tokens / ours:,.0f} vs the model's forward on full "
        f"[{rows} x {pass_width}] batches {model_rate:,.0f}: "
        f"{real_tokens / ours / model_rate:.0%} (target >= 60%)"
    )
    # What the model reads: each distinct context once, then every continuation but its last
    # token (lm-eval's own split of each pair).
    contexts, read = set(), 0
    for tokens, request in zip(inputs, requests):
        scored = lm.continuation_length(*request.args)
        contexts.add(tuple(tokens[: len(tokens) + 1 - scored]))
        read += scored - 1
    read += sum(map(len, contexts))
    print(
        f"  tokens read (contexts once): {read:,}, {read / ours:,.0f}/s, "
        f"{read / ours / model_rate:.0%} of the full-batch rate"
    )

    # 3: generation.
    prompts = text_pieces(tokenizer, rng, args.prompts, (10, 60))
    settings = {
        "until": ["never appears \x00"],
        "max_gen_toks": args.new_tokens,
        "do_sample": False,
    }
    generate_requests = [Instance("generate_until", {}, (p, dict(settings)), 0) for p in prompts]
    lengths = [1 + len(tokenizer.tokenize(p)) for p in prompts]

    def one_prompt_at_a_time():
        return [
            causal_lm.generate(
                p, max_length=n + args.new_tokens, strip_prompt=True, stop_token_ids=None
            )
            for p, n in zip(prompts, lengths)
        ]

    def batched_generation():
        return lm.generate_until(generate_requests, disable_tqdm=True)

    ours, baseline = alternate(batched_generation, one_prompt_at_a_time, args.repeats)
    same = batched_generation() == one_prompt_at_a_time()
    tokens = args.prompts * args.new_tokens
    print(f"\ngenerate_until: {args.prompts} prompts x {args.new_tokens} tokens, greedy")
    print(f"  GLaMLM.generate_until         {ours * 1e3:8.1f} ms  {tokens / ours:8.1f} tokens/s")
    rate = tokens / baseline
    print(f"  generate(), one prompt a time {baseline * 1e3:8.1f} ms  {rate:8.1f} tokens/s")
    print(f"  speed-up: {baseline / ours:.2f}x (target >= 3x); same text: {same}")
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
