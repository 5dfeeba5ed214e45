"""Batched, jit-compiled label scoring of the query groups in the memlong/local/full rows; the
demonstrations shared by a group's windows run once (`prefix`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from memlong_jax.eval import scoring
from memlong_jax.eval.icl.prefix import (Prefix, extend_local, lower_stack_after, run_prefix,
                                         shared_prefix)
from memlong_jax.eval.icl.prompts import Group, Query
from memlong_jax.eval.icl.tasks import bucket
from memlong_jax.memlong import scan
from memlong_jax.memlong.config import MemLongConfig
from memlong_jax.memlong.retrievers import HIDDEN, Retriever


class ICLScorer:
    """Batched, jitted label scoring of queries with per-row memory (see the module doc).
    `share_prefix`: run the tokens every window of a `score` call starts with once (the k
    demonstrations; `prefix`); off, each window runs whole (the reference path, also the
    one for windows that share nothing, like `full`'s)."""

    def __init__(self, module, params, mcfg: MemLongConfig, retriever: Retriever = HIDDEN,
                 capacity_chunks: int = 0, batch_size: int = 8, batch_tokens: int = 8192,
                 share_prefix: bool = True):
        capacity = max(capacity_chunks, mcfg.top_k, 2)
        self.mcfg = mcfg.replace(memory_tokens=capacity * mcfg.chunk_size)
        self.base = scoring.Scorer(module, params, self.mcfg,
                                   scoring.Protocol((mcfg.chunk_size,)), retriever)
        self.module, self.params, self.retriever = module, params, retriever
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.share_prefix = share_prefix
        self.compile_seconds = 0.0
        self._last_prefix: tuple = (None, 0, None)   # (its ids as bytes, length, Prefix)

    @property
    def capacity(self) -> int:
        return self.mcfg.capacity_chunks

    def _call(self, name: str, fn, *args):
        """`fn(params, *args)` compiled once per argument shapes; compile time accumulated."""
        shapes = tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree_util.tree_leaves(args))
        key = (name, tuple(a is None for a in args), shapes)
        before = self.base.last_compile_seconds
        args = (self.params, *args)
        out = self.base._compiled(key, fn, *args)(*args)
        self.compile_seconds += self.base.last_compile_seconds - before
        return out

    def _ingest(self, params, state, ids, key_emb, pad_chunks):
        """Memory streams `ids` `[B, n * tau]`, the first `pad_chunks` `[B]` chunks of each row
        padding: ingest all, then mark the padding slots (0..pad-1: an empty memory that never
        evicts fills slots in order) empty; a row of padding only has no causal query."""
        state = scan.ingest_prefix(self.module, self.mcfg, params, state, ids, key_emb)
        slots = jnp.arange(state.memory.capacity)[None]
        memory = state.memory.replace(valid=state.memory.valid & (slots >= pad_chunks[:, None]))
        real = pad_chunks < ids.shape[1] // self.mcfg.chunk_size
        return state._replace(memory=memory, has_last=state.has_last & real)

    def _window(self, params, state, ids, head_at, targets, mask, prompt_len, segment_query,
                prefix: Prefix | None):
        """Label log-probabilities: ids `[R, S]` right-padded windows (R a multiple of the
        memory's rows: the memory of a row is tiled over its R/B label rows), head_at `[R, P]`
        positions whose next-token log-probs score `targets` `[R, P, L']` (summed over P where
        `mask`). With a `prefix`, `ids` and `head_at` are the windows' tokens after it (and
        `state` None: no memory). Returns (scores `[R, L']`, argmax next token after the
        prompt `[R]`)."""
        if state is None:
            logits = extend_local(self.module, params, prefix, ids, head_at)
        else:
            logits = self._memory_logits(params, state, ids, head_at, prompt_len,
                                         segment_query, prefix)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, targets, axis=2)
        return jnp.where(mask, picked, 0.0).sum(axis=1), jnp.argmax(logits[:, 0], axis=-1)

    def _memory_logits(self, params, state, ids, head_at, prompt_len, segment_query,
                       prefix: Prefix | None):
        """`_window`'s logits with each row's memory: `scan.read_step`, the layers below the
        memory layer run only after the prefix when there is one."""
        reps = ids.shape[0] // state.has_last.shape[0]
        if reps > 1:
            tile = lambda a: jnp.repeat(a, reps, axis=0)
            state = jax.tree_util.tree_map(tile, state)
            segment_query = None if segment_query is None else tile(segment_query)
        lower = None
        if prefix is not None:
            ids, lower = lower_stack_after(self.module, self.mcfg, params, prefix, ids)
            head_at = head_at + prefix.length
        if segment_query is None and self.mcfg.query_mode == "segment":
            if lower is None:
                lower = scan.lower_stack(self.module, self.mcfg, params, ids)
            x = lower[2].astype(jnp.float32)
            real = jnp.arange(ids.shape[1])[None, :, None] < prompt_len[:, None, None]
            pooled = jnp.where(real, x, 0.0).sum(axis=1) / prompt_len[:, None]
            segment_query = pooled / jnp.maximum(
                jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return scan.read_step(self.module, self.mcfg, params, state, ids,
                              segment_query=segment_query, head_at=head_at, lower=lower)[1]

    def prefix(self, windows: list[np.ndarray]) -> tuple[int, Prefix | None]:
        """(length, run) of the prefix all `windows` share, run once and kept for the next
        call with the same one (`local` and `memlong` groups of a seed share their prompts);
        (0, None) when there is none, or `share_prefix` is off."""
        length = shared_prefix(windows) if self.share_prefix else 0
        if not length:
            return 0, None
        key = windows[0][:length].tobytes()
        if self._last_prefix[0] != key:
            ids = np.zeros((1, bucket(length, 16)), np.int32)
            ids[0, :length] = windows[0][:length]
            run = self._call("prefix", lambda params, *args: run_prefix(
                self.module, self.mcfg, params, *args), jnp.asarray(ids),
                jnp.asarray(length, jnp.int32))
            self._last_prefix = (key, length, run)
        return self._last_prefix[1:]

    def _memory(self, streams: list[np.ndarray]):
        """A memory state per row holding that row's stream (None: every stream is empty)."""
        tau = self.mcfg.chunk_size
        chunks = [len(s) // tau for s in streams]
        if not max(chunks):
            return None
        n = bucket(max(chunks))
        if n > self.capacity:
            raise ValueError(f"{n} memory chunks do not fit the capacity {self.capacity}")
        ids = np.zeros((len(streams), n * tau), np.int32)
        for row, stream in enumerate(streams):
            if len(stream):
                ids[row, -len(stream):] = stream
        pad = np.asarray([n - c for c in chunks], np.int32)
        key_emb = None
        if self.retriever.host_side:   # embeddings of the real chunks only, in one batch
            real = np.concatenate([s for s in streams if len(s)])[None]
            emb = np.asarray(self.retriever.chunk_keys(real)[0])
            key_emb = np.zeros((len(streams), n, emb.shape[-1]), np.float32)
            start = 0
            for row, c in enumerate(chunks):
                key_emb[row, n - c:] = emb[start:start + c]
                start += c
            key_emb = jnp.asarray(key_emb)
        return self._call("ingest", self._ingest, self.base.empty_state(len(streams)),
                          jnp.asarray(ids), key_emb, jnp.asarray(pad))

    def _score_batch(self, queries: list[Query], labels: list[np.ndarray], shared: int = 0,
                     prefix: Prefix | None = None):
        """Scores and argmax of `queries`, whose windows start with the `shared` tokens that
        `prefix` ran (0, None: no prefix)."""
        n_labels, longest = len(labels), max(len(t) for t in labels)
        state = self._memory([q.memory for q in queries])
        if state is None and prefix is None:
            state = self.base.empty_state(len(queries))
        windows = [q.window for q in queries]
        if longest == 1:   # every label word is one token: one row per item
            rows = windows
            heads = [[len(w) - 1] for w in windows]
            targets = np.broadcast_to(np.concatenate(labels)[None, None],
                                      (len(rows), 1, n_labels))
            mask = np.ones((len(rows), 1, 1), bool)
        else:              # one row per (item, label): prompt + label tokens but the last
            rows = [np.concatenate([w, t[:-1]]) for w in windows for t in labels]
            heads = [[len(w) - 1 + j for j in range(longest)] for w in windows for _ in labels]
            targets = np.zeros((len(rows), longest, 1), np.int32)
            mask = np.zeros((len(rows), longest, 1), bool)
            for r, t in enumerate(labels * len(windows)):
                targets[r, :len(t), 0], mask[r, :len(t), 0] = t, True
        rows = [r[shared:] for r in rows]
        heads = np.asarray(heads, np.int32) - shared
        length = bucket(max(len(r) for r in rows), 16)
        ids = np.zeros((len(rows), length), np.int32)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = row
        heads = np.minimum(np.asarray(heads, np.int32), length - 1)
        prompt_len = np.asarray([len(w) for w in windows for _ in range(len(rows) // len(windows))],
                                np.int32)
        scores, argmax = self._call("window", self._window, state, jnp.asarray(ids),
                                    jnp.asarray(heads), jnp.asarray(targets, jnp.int32),
                                    jnp.asarray(mask), jnp.asarray(prompt_len),
                                    self.retriever.window_query(windows), prefix)
        scores, argmax = np.asarray(scores), np.asarray(argmax)
        if longest == 1:
            return scores, argmax
        return scores.reshape(len(windows), n_labels), argmax[::n_labels]

    def batch_rows(self, length: int) -> int:
        """Items per batch when each item takes `length` window tokens: `batch_size`, fewer for
        long windows (at most `batch_tokens` tokens; a power of two, so few shapes compile)."""
        fit = max(1, self.batch_tokens // max(length, 1))
        return min(self.batch_size, 2 ** (fit.bit_length() - 1))

    def score(self, queries: list[Query], labels: list[np.ndarray], progress=None):
        """Label scores `[N, L]` (summed log-probs of each label's tokens after the query) and
        the argmax next token `[N]` for every query."""
        n = len(queries)
        scores = np.zeros((n, len(labels)), np.float32)
        argmax = np.zeros((n,), np.int64)
        extra = max(len(t) for t in labels) - 1
        rows_per_item = len(labels) if extra else 1
        order = sorted(range(n), key=lambda i: (len(queries[i].window), len(queries[i].memory)))
        shared, prefix = self.prefix([q.window for q in queries])
        start = 0
        while start < n:
            longest = queries[order[min(start + self.batch_size, n) - 1]].window
            size = self.batch_rows(bucket(len(longest) + extra, 16) * rows_per_item)
            rows = order[start:start + size]
            filled = rows + [rows[-1]] * (size - len(rows))
            batch_scores, batch_argmax = self._score_batch([queries[i] for i in filled], labels,
                                                           shared, prefix)
            scores[rows], argmax[rows] = batch_scores[:len(rows)], batch_argmax[:len(rows)]
            if progress is not None:
                progress(len(rows))
            start += size
        return scores, argmax


def memory_capacity(groups: list[Group], tau: int) -> int:
    """Chunks a memory needs so that no group's batch ever evicts."""
    chunks = [len(q.memory) // tau for g in groups if g.queries for q in g.queries]
    return bucket(max(chunks)) if chunks and max(chunks) else 0


def argmax_correct(tokenizer, token: int, gold: str) -> bool:
    """Upstream's rule: the decoded next token, stripped, is non-empty and starts the gold word."""
    word = tokenizer.decode([int(token)]).strip()
    return bool(word) and gold.startswith(word)
