"""Training data: text / JSONL / directories -> cached token file -> packed blocks -> streams.

* Sources are tokenized once into `cache_dir/<hash>.tokens` (raw uint16/uint32, read back with
  `np.memmap`); the hash covers the tokenizer and every source file's content, and
  the file appears atomically (tmp + rename), so an interrupted run never leaves a bad cache.
* Documents are concatenated in order and cut into `seq_len` blocks, remainder dropped, no
  separator inserted (as upstream; the tokenizer's own special tokens, e.g.
  LLaMA's BOS, stay). The last `val_fraction` of blocks is the validation split (no shuffling).
* Streams (as upstream): the training blocks are split into `streams` contiguous slices, one per
  batch row (= replica row); micro-step j reads block j of every slice. Consecutive micro-steps
  of a row therefore see consecutive blocks of the same documents, which is what the memory
  carried across steps relies on. The cursor is the number of micro-steps consumed.
* Optionally a fraction of each stream's episodes of consecutive blocks carries recall items
  (`train.recall_mix`): a pure function of seed, stream and micro-step, so resuming is exact.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from memlong_jax.errors import UserError
from memlong_jax.io.documents import JSONL_SUFFIXES, expand_paths, file_documents, pydoc_text
from memlong_jax.io.safe_paths import contained_file
from memlong_jax.io.tokenizer import read_tokenizer
from memlong_jax.memlong.retrievers import Retriever

PYDOC = "pydoc"


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256): the tokenizer of the random `tiny` model."""

    identity = "bytes-utf8"
    vocab_size = 256

    def encode_batch(self, texts):
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.uint32) for t in texts]

    def decode_batch(self, rows, skip_special_tokens=True):
        return [bytes(int(i) & 255 for i in row).decode("utf-8", errors="replace") for row in rows]


class HFTokenizer:
    """A `tokenizers.Tokenizer` (tokenizer.json) with the interface the pipeline needs."""

    def __init__(self, path: str):
        self._tok = read_tokenizer(path)
        self._tok.no_padding()
        self._tok.no_truncation()
        with open(path, "rb") as f:
            self.identity = "sha256:" + hashlib.sha256(f.read()).hexdigest()
        self.vocab_size = self._tok.get_vocab_size()

    def encode_batch(self, texts):
        return [np.asarray(e.ids, np.uint32) for e in self._tok.encode_batch(texts)]

    def decode_batch(self, rows, skip_special_tokens=True):
        return self._tok.decode_batch([list(map(int, r)) for r in rows],
                                      skip_special_tokens=skip_special_tokens)


def load_tokenizer(spec: str, init_from: str, vocab_size: int):
    """`auto`: init_from's tokenizer.json, else bytes when the vocab has room for them."""
    if spec == "byte":
        tok = ByteTokenizer()
    elif spec == "auto":
        path = contained_file(init_from, "tokenizer.json", "tokenizer file") if init_from else None
        if path:
            tok = HFTokenizer(path)
        elif vocab_size >= 256:
            tok = ByteTokenizer()
        else:
            raise UserError(f"no tokenizer: {init_from or 'the model'} has no tokenizer.json and "
                            f"the vocab ({vocab_size}) cannot hold bytes; --set tokenizer=PATH")
    else:
        path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
        if not os.path.isfile(path):
            raise UserError(f"tokenizer {spec}: no tokenizer.json there")
        tok = HFTokenizer(path)
    if tok.vocab_size > vocab_size:
        raise UserError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab is "
                        f"{vocab_size}")
    return tok


def list_sources(spec: str) -> list[str]:
    """Expand `a.txt,b.jsonl,dir/` into files (directories recursively, sorted)."""
    paths = [p.strip() for p in spec.split(",") if p.strip()]
    if not paths:
        raise UserError("no training data: --set data=PATH (text files, .jsonl, directories)")
    return [f for p in paths for f in ([PYDOC] if p == PYDOC else expand_paths([p]))]


def iter_documents(path: str):
    """The documents of one source: a text file is one document, a JSONL line another."""
    if path == PYDOC:
        return [pydoc_text()]
    return [doc.text for doc in file_documents(path)]


def fingerprint(files, tokenizer) -> str:
    """SHA-256 of the tokenizer's identity and every source's bytes: names the token cache and
    is recorded in each checkpoint, so a resume on other data of the same size is caught."""
    digest = hashlib.sha256(json.dumps([tokenizer.identity, len(files)]).encode())
    for path in files:
        if path == PYDOC:
            digest.update(PYDOC.encode())
            continue
        try:
            with open(path, "rb") as f:
                kind = "jsonl" if path.lower().endswith(JSONL_SUFFIXES) else "text"
                digest.update(f"\0{kind}:{os.fstat(f.fileno()).st_size}\0".encode())
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError as err:
            raise UserError(f"cannot read {path}: {err.strerror}") from None
    return digest.hexdigest()


def token_file(files, tokenizer, cache_dir: str, batch_docs: int = 64,
               key: str | None = None) -> np.ndarray:
    """Tokenize `files` once; return the memory-mapped token array (uint16 when it fits).
    `key`: their `fingerprint`, when the caller has it already."""
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    key = (key or fingerprint(files, tokenizer))[:24]
    path = os.path.join(cache_dir, f"{key}.tokens")
    if not os.path.isfile(path):
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create cache_dir {cache_dir}: {err.strerror}") from None
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as out:
                for source in files:
                    docs = []
                    for doc in iter_documents(source):
                        docs.append(doc)
                        if len(docs) == batch_docs:
                            for ids in tokenizer.encode_batch(docs):
                                out.write(ids.astype(dtype).tobytes())
                            docs = []
                    for ids in tokenizer.encode_batch(docs):
                        out.write(ids.astype(dtype).tobytes())
            os.replace(tmp, path)
        except OSError as err:
            raise UserError(f"cannot write token cache in {cache_dir}: {err.strerror}") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    if os.path.getsize(path) == 0:
        return np.zeros((0,), dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class Blocks:
    """Packed `seq_len` blocks of a token array, split into train / validation."""

    def __init__(self, tokens: np.ndarray, seq_len: int, val_fraction: float):
        n_blocks = len(tokens) // seq_len
        if n_blocks == 0:
            raise UserError(f"the data has {len(tokens)} tokens, fewer than one sequence of "
                            f"seq_len={seq_len}")
        self.tokens, self.seq_len = tokens, seq_len
        self.n_val = int(round(n_blocks * val_fraction)) if val_fraction else 0
        if val_fraction and n_blocks > 1:
            self.n_val = max(1, self.n_val)
        self.n_train = n_blocks - self.n_val
        if self.n_train <= 0:
            raise UserError(f"the data has only {n_blocks} block(s) of {seq_len} tokens: nothing "
                            "left for training after the validation split")

    def block(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[i * self.seq_len:(i + 1) * self.seq_len])

    def validation_tokens(self) -> np.ndarray:
        start = self.n_train * self.seq_len
        return np.asarray(self.tokens[start:start + self.n_val * self.seq_len])


class Streams:
    """`streams` contiguous slices of the training blocks, walked in lockstep."""

    def __init__(self, blocks: Blocks, streams: int, grad_accum: int, mix=None, start: int = 0):
        self.blocks, self.streams, self.grad_accum = blocks, streams, grad_accum
        self.start = start   # micro-steps skipped: the run's micro-step m reads m + start
        self.mix = mix   # a train.recall_mix.RecallMix, or None: the blocks as they are
        per_stream = blocks.n_train // streams
        # Whole optimizer steps per epoch, so a step never straddles an epoch boundary.
        self.steps_per_epoch = per_stream // grad_accum
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the training split has {blocks.n_train} blocks of {blocks.seq_len} tokens: too "
                f"few for {streams} stream(s) x grad_accum {grad_accum}; need at least "
                f"{streams * grad_accum}")
        self.per_stream = per_stream
        self.micro_per_epoch = self.steps_per_epoch * grad_accum

    def block_index(self, micro_step: int, row: int) -> int:
        return row * self.per_stream + micro_step % self.micro_per_epoch

    def batch(self, step: int, rows=None) -> np.ndarray:
        """Token ids `[grad_accum, streams, seq_len]` (int32) of optimizer step `step`; `rows`
        restricts to some streams (a host's share), other rows are zeros."""
        out = np.zeros((self.grad_accum, self.streams, self.blocks.seq_len), np.int32)
        rows = range(self.streams) if rows is None else rows
        for i in range(self.grad_accum):
            for r in rows:
                out[i, r] = self.tokens(step * self.grad_accum + i, r)
        return out

    def context(self, step: int, width: int, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """`prefix_overlap`'s input for optimizer step `step`: (context `[grad_accum, streams,
        width]` int32, has_context `[grad_accum]` bool). Each micro-step's context is the last
        `width` tokens of the block its stream read at the micro-step before (as trained: recall
        episodes mixed in; across an epoch boundary, the previous epoch's last block, which
        memory holds). The very first micro-step has none (has_context False, zeros): it runs
        alone, as the first window of a prefix does when it is read. `rows` as in `batch`."""
        out = np.zeros((self.grad_accum, self.streams, width), np.int32)
        micro = step * self.grad_accum + np.arange(self.grad_accum)
        rows = range(self.streams) if rows is None else rows
        has = micro + self.start > 0
        for i in np.flatnonzero(has):
            for r in rows:
                out[i, r] = self.tokens(int(micro[i]) - 1, r)[self.blocks.seq_len - width:]
        return out, has

    def tokens(self, micro_step: int, row: int) -> np.ndarray:
        """The block that stream `row` reads at `micro_step` (recall episodes mixed in)."""
        micro_step += self.start
        real = lambda micro: self.blocks.block(self.block_index(micro, row))
        return real(micro_step) if self.mix is None else self.mix.block(row, micro_step, real)

    def cursor(self, step: int) -> dict:
        micro = step * self.grad_accum + self.start
        return {"micro_step": micro, "epoch": micro // self.micro_per_epoch,
                "block_in_stream": micro % self.micro_per_epoch, "streams": self.streams,
                "per_stream": self.per_stream}


def validation_windows(blocks: Blocks, length: int, rows: int, batches: int) -> np.ndarray:
    """`[n, rows, length]` consecutive windows of the validation stream (n <= batches)."""
    tokens = blocks.validation_tokens()
    n = min(batches, len(tokens) // (length * rows))
    return tokens[:n * rows * length].astype(np.int32).reshape(n, rows, length)


class KeyTable:
    """Precomputed text-retriever keys: one embedding per distinct `tau`-token chunk of a corpus
    (written by `python -m train.keys`). Looked up by chunk content, so any block or validation
    window of that corpus finds its keys and the text encoder never runs during training."""

    def __init__(self, path: str, tau: int):
        try:
            with np.load(path) as data:
                chunks, vectors = data["chunks"], data["vectors"]
                meta = json.loads(str(data["meta"]))
        except (OSError, KeyError, ValueError) as err:
            raise UserError(f"key table {path}: not a train.keys file ({err})") from None
        if meta.get("tau") != tau:
            raise UserError(f"key table {path} was built for chunk_size {meta.get('tau')}, "
                            f"this run uses {tau}")
        self.meta, self.tau, self.dim = meta, tau, vectors.shape[1]
        self.vectors = vectors.astype(np.float32)
        self.rows = {chunk.tobytes(): i for i, chunk in enumerate(chunks.astype(np.uint32))}

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """ids `[..., S]` -> keys `[..., S/tau, d]`; a chunk missing from the table is an error."""
        chunks = np.asarray(ids, np.uint32).reshape(-1, self.tau)
        try:
            rows = [self.rows[c.tobytes()] for c in chunks]
        except KeyError:
            raise UserError("a training chunk is missing from the key table: it was built from "
                            "other data or another tokenizer (rebuild it with python -m "
                            "train.keys)") from None
        return self.vectors[rows].reshape(*ids.shape[:-1], ids.shape[-1] // self.tau, -1)


def host_embeddings(retriever: Retriever, ids: np.ndarray, window: int | None = None):
    """The retriever's host-side inputs for training ids `[..., B, S]`: key_emb
    `[..., B, S/tau, d]` and the segment query `[..., B, d]` of the last `window` (default S)
    tokens, each None where the retriever makes it in-graph."""
    lead, (batch, length) = ids.shape[:-2], ids.shape[-2:]
    flat = ids.reshape(-1, length)
    keys = retriever.chunk_keys(flat)
    query = retriever.window_query(flat[:, -(window or length):])
    if keys is not None:
        keys = np.asarray(keys, np.float32).reshape(*lead, batch, *keys.shape[1:])
    if query is not None:
        query = np.asarray(query, np.float32).reshape(*lead, batch, -1)
    return keys, query
