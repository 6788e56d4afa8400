"""GLaM's input pipeline (tf.data): document sources, the quality filter, packing, streaming."""

from keras_glam.data.packing import causal_lm_example
from keras_glam.data.packing import pack_documents
from keras_glam.data.packing import packed_lm_dataset
from keras_glam.data.quality import FilteredSource
from keras_glam.data.quality import QualityClassifier
from keras_glam.data.quality import QualityFeatures
from keras_glam.data.quality import filter_documents
from keras_glam.data.quality import keep_probability
from keras_glam.data.quality import load_quality_classifier
from keras_glam.data.quality import score_documents
from keras_glam.data.quality import train_quality_classifier
from keras_glam.data.sources import DataError
from keras_glam.data.sources import DocumentList
from keras_glam.data.sources import HuggingFaceDataset
from keras_glam.data.sources import JsonLines
from keras_glam.data.sources import ParquetFiles
from keras_glam.data.sources import TextFiles
from keras_glam.data.sources import TFRecordFiles
from keras_glam.data.sources import held_out_mask
from keras_glam.data.streaming import GLAM_MIXTURE
from keras_glam.data.streaming import DataIterator
from keras_glam.data.streaming import StreamingData
from keras_glam.data.streaming import parse_data_spec
from keras_glam.data.streaming import parse_mixture
from keras_glam.data.streaming import sources_from_specs
from keras_glam.data.text_sources import document_dataset
from keras_glam.data.text_sources import text_files

__all__ = [
    "GLAM_MIXTURE",
    "DataError",
    "DataIterator",
    "DocumentList",
    "FilteredSource",
    "HuggingFaceDataset",
    "JsonLines",
    "ParquetFiles",
    "QualityClassifier",
    "QualityFeatures",
    "StreamingData",
    "TFRecordFiles",
    "TextFiles",
    "causal_lm_example",
    "document_dataset",
    "filter_documents",
    "held_out_mask",
    "keep_probability",
    "load_quality_classifier",
    "pack_documents",
    "packed_lm_dataset",
    "parse_data_spec",
    "parse_mixture",
    "score_documents",
    "sources_from_specs",
    "text_files",
    "train_quality_classifier",
]
