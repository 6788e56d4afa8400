"""Load a GLaM preset and generate text.

The preset can be a builtin name (an architecture with GLaM's random initialisation: its text is
noise until trained), a directory written by `save_to_preset` or `glam-train` (`glam_run/preset`),
or a Hub handle `hf://org/name`:

    python examples/generate_from_preset.py --preset glam_run/preset --prompt "The " "If the "

Decoding is KV-cached and XLA-compiled; `--sampler` takes any KerasHub sampler name.
"""

import argparse


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="glam_small_16e",
                        help="builtin name, preset directory or hf://org/name")
    parser.add_argument("--prompt", nargs="+", default=["The "], help="one or more prompts")
    parser.add_argument("--max-length", type=int, default=48, help="prompt + generated tokens")
    parser.add_argument("--sampler", default="greedy", help="greedy, top_k, top_p, beam, ...")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    import keras

    import keras_glam

    # Seed before the tokenizer exists: tf-text's SentencePiece resource does not survive a reseed.
    keras.utils.set_random_seed(args.seed)
    lm = keras_glam.GLaMCausalLM.from_preset(args.preset)
    lm.compile(sampler=args.sampler)
    for prompt, text in zip(args.prompt, lm.generate(args.prompt, max_length=args.max_length)):
        print(f"--- {prompt!r}\n{text}")


if __name__ == "__main__":
    main()
