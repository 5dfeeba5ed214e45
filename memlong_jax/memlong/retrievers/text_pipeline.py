"""Host side of the text retriever: LM token ids -> decoded text -> sentence-encoder embeddings.

As upstream, each tau-token chunk is decoded with the LM's own
tokenizer (special tokens skipped) and re-tokenised by the encoder. Everything is embedded in
batches before the jitted scan, so no host round trip happens inside it.
"""

from __future__ import annotations

import numpy as np

from memlong_jax.memlong.retrievers.text_encoder import TextEncoder


def decode_chunks(lm_tokenizer, ids, tau: int) -> list[list[str]]:
    """`ids` `[B, N]` (N a multiple of tau) -> per row, the decoded text of each chunk."""
    ids = np.asarray(ids)
    batch, length = ids.shape
    chunks = ids.reshape(batch, length // tau, tau).tolist()
    return [lm_tokenizer.decode_batch(row, skip_special_tokens=True) for row in chunks]


def text_embeddings(encoder: TextEncoder, lm_tokenizer, ids, tau: int, window: int | None = None):
    """Key embeddings `[B, N/tau, d]` for every chunk of `ids`, and, when `window` is given, the
    `segment`-mode query `[B, d]`: the embedding of the text of the last `window` tokens."""
    texts = decode_chunks(lm_tokenizer, ids, tau)
    flat = [text for row in texts for text in row]
    keys = encoder.encode_texts(flat).reshape(len(texts), len(texts[0]), -1)
    if window is None:
        return keys, None
    return keys, segment_query(encoder, lm_tokenizer, ids, window)


def segment_query(encoder: TextEncoder, lm_tokenizer, ids, window: int):
    """The `segment`-mode query `[B, d]`: the embedding of the text of the last `window` tokens."""
    tails = lm_tokenizer.decode_batch(np.asarray(ids)[:, -window:].tolist(),
                                      skip_special_tokens=True)
    return encoder.encode_texts(tails)
