"""Share a GLaM on the Hugging Face Hub and load it back, as anyone else would.

    export HF_TOKEN=hf_...            # a token with write access
    python examples/share_on_hub.py --repo hf://your-name/glam-small --preset glam_run/preset

`keras_glam.hub.publish_model` checks the token, saves the preset, writes keras_glam's model card
(parameter counts, training details) and sends it all as one commit, retrying transient failures.
The script then loads `hf://your-name/glam-small` from the Hub like any user would and checks
that its logits equal the local model's. `HF_ENDPOINT` selects another Hub server.
"""

import argparse
import sys


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", required=True, help="hf://namespace/name")
    parser.add_argument("--preset", default="glam_small_16e",
                        help="what to share: builtin name or preset directory")
    parser.add_argument("--private", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    import numpy as np

    import keras_glam
    from keras_glam.hub import publish_model

    lm = keras_glam.GLaMCausalLM.from_preset(args.preset)
    result = publish_model(lm, args.repo, private=args.private,
                           description=f"GLaM shared from {args.preset} with keras_glam.")
    print(f"published {result.handle}")

    loaded = keras_glam.GLaMCausalLM.from_preset(result.handle)
    token_ids = np.arange(1, 17, dtype="int32")[None] % lm.backbone.vocabulary_size
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids, dtype=bool)}
    difference = np.max(np.abs(np.asarray(lm(inputs)) - np.asarray(loaded(inputs))))
    print(f"loaded back from the Hub; largest logit difference {difference:.3g}")
    if difference != 0.0:
        sys.exit("The model loaded from the Hub differs from the one published.")
    return result


if __name__ == "__main__":
    main()
