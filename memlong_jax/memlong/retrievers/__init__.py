"""Retrievers: what turns text chunks into the embeddings that memory retrieval compares."""

from memlong_jax.memlong.retrievers.retriever import (HIDDEN, HiddenRetriever, Retriever,
                                                      TextRetriever, make_retriever)
from memlong_jax.memlong.retrievers.text_encoder import (TextEncoder, TextEncoderConfig,
                                                         default_encoder_dir, load_text_encoder)

__all__ = ["HIDDEN", "HiddenRetriever", "Retriever", "TextRetriever", "make_retriever",
           "TextEncoder", "TextEncoderConfig", "default_encoder_dir", "load_text_encoder"]
