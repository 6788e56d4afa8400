"""The corpus that is always present: the topic pages of Python's own documentation.

Every CPython ships `pydoc_data.topics` (about 465 KB of English prose and code examples in 79
topic pages), so the default training job and the tests have real text to learn from with no
download and no file to fetch.
"""

import pydoc_data.topics


def pydoc_documents():
    """Return Python's documentation topic pages, one string per document, sorted by topic name."""
    topics = pydoc_data.topics.topics
    return [topics[name] for name in sorted(topics)]


def split_documents(documents, held_out_fraction=0.1):
    """Split documents into (train, held_out) deterministically: every k-th document is held out.

    Whole documents are held out (not random rows) so that held-out loss measures
    generalisation to unseen pages rather than memorised neighbours of training rows.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(
            f"held_out_fraction must be in (0, 1), got {held_out_fraction}."
        )
    if len(documents) < 2:
        raise ValueError(
            f"Need at least 2 documents to hold one out, got {len(documents)}."
        )
    stride = max(2, round(1.0 / held_out_fraction))
    held_out = [doc for i, doc in enumerate(documents) if i % stride == stride - 1]
    train = [doc for i, doc in enumerate(documents) if i % stride != stride - 1]
    return train, held_out
