"""Train a GLaM with `model.fit` on a `tf.data` pipeline of raw text.

The causal LM's preprocessor turns each string into token ids, labels shifted by one and a mask
(KerasHub's convention), so any `tf.data.Dataset` of strings trains it; `compile()` with no
arguments is GLaM's recipe (Adafactor, `rsqrt(max(step, warmup))`, z-loss, load-balance loss).
Held-out loss on whole unseen documents is printed before and after:

    python examples/fit_tf_data.py --preset glam_small_16e --steps 200

For GLaM's packed rows (several documents per row, attention masked at their boundaries), a
weighted mixture of sources and fault-tolerant checkpoints, use `glam-train` or
`keras_glam.data` + `keras_glam.training` instead.
"""

import argparse


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="glam_small_16e")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def text_dataset(documents, batch_size, seed=None):
    """Batches of strings; shuffled and repeated when a seed is given (training)."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(documents)
    if seed is not None:
        dataset = dataset.shuffle(len(documents), seed=seed).repeat()
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def main(argv=None):
    args = parse_arguments(argv)
    import keras

    import keras_glam
    from keras_glam.data.embedded_corpus import pydoc_documents
    from keras_glam.data.embedded_corpus import split_documents

    keras.utils.set_random_seed(args.seed)
    # Chop the documentation pages into paragraphs: one string is one training row.
    paragraphs = [p for doc in pydoc_documents() for p in doc.split("\n\n") if len(p) > 80]
    train_texts, held_out_texts = split_documents(paragraphs, held_out_fraction=0.1)
    preprocessor = keras_glam.GLaMCausalLMPreprocessor.from_preset(
        args.preset, sequence_length=args.sequence_length
    )
    lm = keras_glam.GLaMCausalLM.from_preset(args.preset, preprocessor=preprocessor)
    lm.compile()
    held_out = text_dataset(held_out_texts[:64], args.batch_size)
    before = lm.evaluate(held_out, verbose=0, return_dict=True)["loss"]
    lm.fit(text_dataset(train_texts, args.batch_size, seed=args.seed),
           steps_per_epoch=args.steps, epochs=1, verbose=2)
    after = lm.evaluate(held_out, verbose=0, return_dict=True)["loss"]
    print(f"held-out loss: {before:.3f} before, {after:.3f} after {args.steps} steps")
    return before, after


if __name__ == "__main__":
    main()
