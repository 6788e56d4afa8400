"""GLaM's input pipeline (tf.data): text sources, document packing, weighted mixtures."""

from keras_glam.data.packing import causal_lm_example
from keras_glam.data.packing import pack_documents
from keras_glam.data.packing import packed_lm_dataset
from keras_glam.data.text_sources import document_dataset
from keras_glam.data.text_sources import text_files

__all__ = [
    "causal_lm_example",
    "document_dataset",
    "pack_documents",
    "packed_lm_dataset",
    "text_files",
]
