"""Train a SentencePiece vocabulary for GLaM models.

GLaM used a SentencePiece vocabulary (256K entries in the paper, 32K in its parameter table).
`train_vocabulary` makes one from any corpus with the special-token layout `GLaMTokenizer`
expects: `<pad>`=0, `</s>`=1 (end of document), `<s>`=2 (start), `<unk>`=3.

The defaults keep text exactly recoverable (`decode(encode(text)) == text`): no normalisation,
whitespace runs and newlines kept (code and indentation matter), digits split, unknown
characters falling back to bytes.
"""

import io

SPECIAL_PIECES = {"pad": "<pad>", "eos": "</s>", "bos": "<s>", "unk": "<unk>"}


def _training_sentences(texts, max_sentence_length):
    """SentencePiece trains on sentences; paragraphs of the documents serve as such."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(
                f"train_vocabulary expects strings, got {type(text).__name__}."
            )
        for paragraph in text.split("\n\n"):
            if paragraph.strip():
                yield paragraph[:max_sentence_length]


def train_vocabulary(
    texts,
    vocabulary_size,
    output_path=None,
    model_type="unigram",
    character_coverage=1.0,
    max_sentence_length=65536,
    seed_sentencepieces=1_000_000,
    num_threads=2,
):
    """Train a SentencePiece model on `texts` and return its serialized proto as bytes.

    Args:
        texts: iterable of strings (documents).
        vocabulary_size: number of pieces including the 4 special tokens and 256 byte pieces.
        output_path: optional file path; the model proto is also written there.
        model_type: `"unigram"` (as T5 and GLaM) or `"bpe"`.
        character_coverage: fraction of characters covered by pieces; the rest fall back to bytes.
        max_sentence_length: paragraphs longer than this (in bytes) are truncated for training.
        seed_sentencepieces: size of the seed piece set for unigram training.
        num_threads: trainer threads.

    Example:
    ```python
    from keras_glam.data import pydoc_documents, train_vocabulary
    proto = train_vocabulary(pydoc_documents(), vocabulary_size=1000)
    tokenizer = keras_glam.GLaMTokenizer(proto=proto)
    ```
    """
    import sentencepiece

    sentences = list(_training_sentences(texts, max_sentence_length))
    if not sentences:
        raise ValueError(
            "Cannot train a vocabulary on an empty corpus: every text was empty or "
            "whitespace. Pass at least one non-empty document."
        )
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocabulary_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece=SPECIAL_PIECES["pad"],
            eos_piece=SPECIAL_PIECES["eos"],
            bos_piece=SPECIAL_PIECES["bos"],
            unk_piece=SPECIAL_PIECES["unk"],
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            user_defined_symbols=["\n"],
            split_digits=True,
            max_sentence_length=max_sentence_length,
            seed_sentencepiece_size=seed_sentencepieces,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as error:
        if "Vocabulary size too high" in str(error):
            raise ValueError(
                f"The corpus is too small for a vocabulary of {vocabulary_size} pieces "
                f"({error}). Use a smaller vocabulary_size or more text."
            ) from None
        raise
    proto = model.getvalue()
    if output_path is not None:
        with open(output_path, "wb") as file:
            file.write(proto)
    return proto


if __name__ == "__main__":
    # Regenerates the vocabulary of the small builtin presets, one copy in each; from the
    # repository root:
    #   python -m keras_glam.data.vocabulary presets/*/assets/tokenizer/vocabulary.spm
    import argparse
    import shutil

    from keras_glam.data.embedded_corpus import pydoc_documents

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_paths", nargs="+")
    parser.add_argument("--vocabulary-size", type=int, default=4096)
    args = parser.parse_args()
    first, *copies = args.output_paths
    train_vocabulary(pydoc_documents(), args.vocabulary_size, first)
    for path in copies:
        shutil.copyfile(first, path)
    print(f"wrote {', '.join(args.output_paths)}")
