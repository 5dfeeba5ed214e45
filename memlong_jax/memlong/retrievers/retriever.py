"""The one interface behind which the two retrievers live (as meliad keeps memory behind a small
one): what a chunk's key embedding is, what a window's query is, how wide they are, and the
empty memory they fit.

- `hidden`: the memory layer's normed input, mean-pooled per chunk (`scan.pooled_chunks`), made
  inside the jitted scan; nothing happens on the host, so `chunk_keys`/`window_query` give None
  and the scan pools in-graph.
- `text` (the paper's): each tau-token chunk is decoded with the LM's own tokenizer (special
  tokens skipped) and embedded by a sentence encoder on the host, in batches, before the jitted
  scan, so no host round trip happens inside it. The segment-mode query is the embedding of the
  window's text, its *end* when the encoder cannot read all of it (all-MiniLM: 256 word pieces,
  about a quarter of a 1024-token window): the question a window ends in is what retrieval is
  for (docs/passkey_retrieval.md).

`make_retriever` is the one place that reads `MemLongConfig.retriever`.
"""

from __future__ import annotations

import numpy as np

from memlong_jax.errors import UserError
from memlong_jax.llama.config import LlamaConfig
from memlong_jax.memlong import scan
from memlong_jax.memlong.config import MemLongConfig
from memlong_jax.memlong.retrievers.text_encoder import (TextEncoder, load_text_encoder,
                                                         read_config)


class Retriever:
    """Interface: `host_side` says whether keys and queries are made on the host (passed into
    the scan) or in-graph (None passed, the scan pools hidden states)."""

    host_side = False
    encoder = None

    def embedding_size(self, lm: LlamaConfig) -> int:
        raise NotImplementedError

    def chunk_keys(self, ids):
        """Key embeddings `[B, N/tau, d]` of the chunks of `ids` `[B, N]`; None: in-graph (or
        no chunk)."""
        return None

    def window_query(self, rows):
        """The segment-mode query `[B, d]` of each window in `rows` (`[B, S]`, or a list of
        1-D id arrays of any lengths); None: in-graph, or not segment mode."""
        return None

    def prefix_queries(self, mcfg: MemLongConfig, ids, window: int):
        """The segment-mode query `[B, n, d]` of each `window`-token segment of a prefix `ids`
        `[B, P]` (the last may be shorter), as `scan.ingest_prefix` splits it with
        `prefix_context=window`; None when ingestion needs none (in-graph, another query mode,
        or one-chunk segments, queried by their own chunk's key)."""
        return None

    def empty_state(self, module, mcfg: MemLongConfig, batch: int) -> scan.MemLongState:
        """An empty memory for `batch` rows whose embeddings are this retriever's."""
        return scan.init_state(module, mcfg, batch, self.embedding_size(module.config))


class HiddenRetriever(Retriever):
    """In-graph: hidden states of the memory layer, pooled by the scan itself."""

    def embedding_size(self, lm: LlamaConfig) -> int:
        return lm.hidden_size


class TextRetriever(Retriever):
    """The sentence encoder on decoded chunk text. `encoder`: a loaded `TextEncoder`, else the
    one in `encoder_dir` (None or "": the bundled all-MiniLM-L6-v2), loaded on first use.
    `key_table` (training): a callable ids `[B, N]` -> keys `[B, N/tau, d]` with a `dim`, used
    instead of the encoder for chunk keys."""

    host_side = True

    def __init__(self, tokenizer, chunk_size: int, segment_query: bool,
                 encoder: TextEncoder | None = None, encoder_dir: str | None = None,
                 key_table=None):
        self.tokenizer, self.tau, self.segment_query = tokenizer, chunk_size, segment_query
        self._encoder, self.encoder_dir, self.key_table = encoder, encoder_dir or None, key_table

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = load_text_encoder(self.encoder_dir)
        return self._encoder

    def embedding_size(self, lm: LlamaConfig | None = None) -> int:
        if self.key_table is not None:
            return self.key_table.dim
        if self._encoder is not None:
            return self._encoder.config.hidden_size
        return read_config(self.encoder_dir).hidden_size

    def _decode(self, rows) -> list[str]:
        if self.tokenizer is None:
            raise UserError("the text retriever needs the LM's tokenizer (or use "
                            "retriever=hidden)")
        return self.tokenizer.decode_batch([np.asarray(r).tolist() for r in rows],
                                           skip_special_tokens=True)

    def chunk_texts(self, ids) -> list[str]:
        """The decoded text of every tau-token chunk of `ids` `[B, N]`, row by row."""
        ids = np.asarray(ids)
        return self._decode(ids.reshape(-1, self.tau))

    def chunk_keys(self, ids):
        ids = np.asarray(ids)
        batch, length = ids.shape
        if not length:
            return None
        if self.key_table is not None:
            return self.key_table(ids)
        keys = self.encoder.encode_texts(self.chunk_texts(ids))
        return keys.reshape(batch, length // self.tau, -1)

    def window_query(self, rows):
        if not self.segment_query:
            return None
        return self.encoder.encode_texts(self._decode(rows), keep="end")

    def prefix_queries(self, mcfg: MemLongConfig, ids, window: int):
        ids = np.asarray(ids)
        if not self.segment_query or mcfg.prefix_context != "window" or not ids.shape[1]:
            return None
        pieces = [row[i:i + window] for row in ids for i in range(0, ids.shape[1], window)]
        return self.window_query(pieces).reshape(ids.shape[0], len(pieces) // ids.shape[0], -1)


HIDDEN = HiddenRetriever()


def make_retriever(mcfg: MemLongConfig, tokenizer=None, encoder: TextEncoder | None = None,
                   encoder_dir: str | None = None, key_table=None) -> Retriever:
    """The retriever `mcfg` names; the text one decodes with the LM `tokenizer`."""
    if mcfg.retriever == "hidden":
        return HIDDEN
    return TextRetriever(tokenizer, mcfg.chunk_size, mcfg.query_mode == "segment", encoder,
                         encoder_dir, key_table)
