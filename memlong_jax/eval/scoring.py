"""The paper's perplexity protocol, with baselines on the same
tokens.

A document is cut into non-overlapping windows of each evaluation length N. In every window the
same positions are scored in every mode: the last `predictions(N)` tokens, all predicted from
inside the final local window of `min(local_window, N)` tokens. Modes:

- `memlong`: the N - local_window prefix tokens go through memory chunk by chunk, then the local
  window is scored with retrieval-causal attention (`scan.ingest_prefix`, fed from the host in
  blocks, then `scan.window_nll`: the pieces of training's `scan.score_sequence`);
- `local`: the local window alone, plain causal attention, no memory;
- `full`: plain causal attention over the whole window (blockwise when long, so 32k fits);
- `block`: the whole window through the training-free block memory (`blockmem`: sinks, a local
  window and retrieved blocks of each layer's own past K/V), chunk by chunk.

Upstream scores 2048 predictions per window, the first of them made by the last *prefix* chunk;
here the first token of the local window is not scored, so every scored token has the same
context in all three modes (2047 predictions for the default 2048-token window).

PPL = exp(mean over windows of the window-mean NLL), as upstream; token-weighted PPL pools all
scored tokens. Only per-token NLL for the scored positions ever leaves the device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from memlong_jax.errors import UserError
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.memlong import blockmem, scan
from memlong_jax.memlong.config import MemLongConfig
from memlong_jax.memlong.retrievers import HIDDEN, Retriever

MODES = ("memlong", "local", "full", "block")
DEFAULT_MODES = ("memlong", "local", "full")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Which windows are cut and which of their tokens are scored.

    lengths         evaluation lengths N (tokens per window), each a multiple of chunk_size
    local_window    tokens of the final segment seen with local attention [last_context_length]
    scored_tokens   the last tokens of each window that are scored (upstream: 2048)
    carry_memory    keep memory across windows and documents of a length (upstream never resets)
    min_doc_tokens  drop shorter documents for every length (upstream: 32767)
    max_windows     at most this many windows per document and length (None: all)
    """

    lengths: tuple[int, ...]
    local_window: int = 2048
    scored_tokens: int = 2048
    carry_memory: bool = False
    min_doc_tokens: int = 0
    max_windows: int | None = None

    def final_window(self, length: int) -> int:
        return min(self.local_window, length)

    def predictions(self, length: int) -> int:
        """Scored predictions per window: the final window's own, except for its first token."""
        return min(self.scored_tokens, self.final_window(length)) - 1

    def validate(self, chunk_size: int) -> "Protocol":
        if not self.lengths:
            raise UserError("no evaluation lengths given")
        for name, value in [("local window", self.local_window), *[("length", n) for n in self.lengths]]:
            if value <= 0 or value % chunk_size:
                raise UserError(f"{name} {value} is not a positive multiple of the chunk size "
                                f"{chunk_size}")
        if self.scored_tokens < 2:
            raise UserError(f"scored tokens must be at least 2, got {self.scored_tokens}")
        if self.max_windows is not None and self.max_windows < 1:
            raise UserError(f"max windows must be at least 1, got {self.max_windows}")
        return self

    def window_starts(self, n_tokens: int, length: int) -> list[int]:
        """Non-overlapping windows from the start of the document; a tail shorter than `length`
        is not scored (upstream also drops a final window that would end exactly at the end)."""
        if n_tokens < self.min_doc_tokens:
            return []
        starts = list(range(0, n_tokens - length + 1, length))
        return starts[: self.max_windows] if self.max_windows else starts


def host_block_tokens(mcfg: MemLongConfig, window: int) -> int:
    """Tokens of a long prefix fed from the host per call: `host_block_chunks` chunks, with
    `prefix_context=window` rounded down to whole local windows (at least one), so that the
    blocks cut the prefix where its ingestion windows do and the setting stays speed-only."""
    tokens = mcfg.host_block_chunks * mcfg.chunk_size
    if mcfg.prefix_context != "window":
        return tokens
    return max(window, tokens // window * window)


def overlap_context(mcfg: MemLongConfig, previous_block):
    """What `scan.ingest_prefix` needs from the previous host block `[B, n]` of a prefix fed in
    blocks (None for the first): its last `prefix_overlap` chunks, or None when off."""
    if previous_block is None or not mcfg.prefix_overlap:
        return None
    return previous_block[:, -mcfg.prefix_overlap * mcfg.chunk_size:]


class Scorer:
    """Jitted window scorers for the modes of one model; each (mode, length) compiles once
    ahead of time, and the compile time is recorded apart from the scoring time. `retriever`:
    the one `mcfg` names (`retrievers.make_retriever`; default: the in-graph hidden one).
    `block`: the block memory settings (needed for the `block` mode only)."""

    def __init__(self, module: LlamaForCausalLM, params, mcfg: MemLongConfig, protocol: Protocol,
                 retriever: Retriever = HIDDEN, block: blockmem.BlockConfig | None = None):
        self.module, self.params, self.mcfg, self.protocol = module, params, mcfg, protocol
        self.retriever, self.block = retriever, block
        for length in protocol.lengths if block else ():
            if length % block.chunk:
                raise UserError(f"length {length} is not a multiple of the block memory's "
                                f"chunk ({block.chunk})")
        self._executables: dict = {}
        self.last_compile_seconds = 0.0
        self._ingest = lambda params, state, ids, key_emb, queries, context: scan.ingest_prefix(
            module, mcfg, params, state, ids, key_emb, protocol.local_window, queries, context)

    def empty_state(self, batch: int = 1) -> scan.MemLongState:
        return self.retriever.empty_state(self.module, self.mcfg, batch)

    def _plain_nll(self, params, ids):
        """Plain causal forward over `ids`; the head runs only where predictions are scored."""
        scored = self.protocol.predictions(ids.shape[1])
        apply = functools.partial(self.module.apply, {"params": params})
        positions = jnp.broadcast_to(jnp.arange(1, ids.shape[1] + 1), ids.shape)
        h = apply(apply(ids, method=self.module.embed), positions, 0,
                  self.module.config.num_hidden_layers, method=self.module.run_layers)
        logits = apply(h[:, -scored - 1:-1], method=self.module.final)
        return scan.token_nll(logits, ids[:, -scored:])

    def _block_nll(self, params, state, ids, targets):
        return blockmem.score_chunks(self.module, self.block, params, state, ids, targets)

    def _block_window(self, ids, progress):
        """The whole window through block memory, fed from the host in blocks of whole chunks
        (progress stays visible, host memory flat); NLL of the scored predictions."""
        chunk = self.block.chunk
        targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
        step = max(chunk, self.mcfg.host_block_chunks * self.mcfg.chunk_size // chunk * chunk)
        state = blockmem.init_state(self.module, self.block, ids.shape[0])
        parts = []
        for start in range(0, ids.shape[1], step):
            part = slice(start, min(start + step, ids.shape[1]))
            args = (self.params, state, ids[:, part], targets[:, part])
            state, nll = jax.block_until_ready(
                self._compiled(("block", part.stop - part.start), self._block_nll, *args)(*args))
            parts.append(np.asarray(nll))
            progress(part.stop - part.start)
        return np.concatenate(parts, axis=1)[:, -self.protocol.predictions(ids.shape[1]) - 1:-1]

    def _compiled(self, key: tuple, fn, *args):
        """`fn` compiled for these arguments' shapes, once per `key`; compilation time is added
        to `last_compile_seconds` (reset by each `window_nll`)."""
        if key not in self._executables:
            start = time.perf_counter()
            self._executables[key] = jax.jit(fn).lower(*args).compile()
            self.last_compile_seconds += time.perf_counter() - start
        return self._executables[key]

    def _memlong_window(self, ids: np.ndarray, state, progress):
        """The prefix into memory block by block (`host_block_chunks` chunks each), then the
        final window scored; (state, NLL).

        The retriever's host work for the next block (decoding, the encoder's tokenizer, its
        batches: all of it for the text retriever, nothing for `hidden`) runs while the current
        block's ingestion, already dispatched, runs on the device: a one-block lookahead on
        this thread. It is enough because a block's host work is shorter than its ingestion,
        and unlike a producer thread it keeps every call in one order, host memory one block
        deep and errors where they were. Each block is waited for before it is counted, so
        `progress` reports only tokens that are in memory."""
        final = self.protocol.final_window(ids.shape[1])
        prefix = ids.shape[1] - final
        step = host_block_tokens(self.mcfg, self.protocol.local_window)
        blocks = [ids[:, start:min(start + step, prefix)] for start in range(0, prefix, step)]
        window = ids[:, prefix:]
        retriever, context = self.retriever, self.protocol.local_window
        embed_block = lambda part: (retriever.chunk_keys(part),
                                    retriever.prefix_queries(self.mcfg, part, context))
        embed_window = lambda: (retriever.chunk_keys(window), retriever.window_query(window))
        state = self.empty_state(ids.shape[0]) if state is None else state
        embeddings = embed_block(blocks[0]) if blocks else embed_window()
        for i, part in enumerate(blocks):
            before = overlap_context(self.mcfg, blocks[i - 1] if i else None)
            args = (self.params, state, part, *embeddings, before)
            state = self._compiled(("ingest", part.shape[1], before is None), self._ingest,
                                   *args)(*args)
            embeddings = embed_block(blocks[i + 1]) if i + 1 < len(blocks) else embed_window()
            state = jax.block_until_ready(state)
            progress(part.shape[1])
        args = (self.params, state, window, *embeddings)
        scored = functools.partial(scan.window_nll, self.module, self.mcfg,
                                   scored=self.protocol.predictions(ids.shape[1]))
        state, nll = jax.block_until_ready(self._compiled(("memlong", final), scored, *args)(*args))
        progress(final)
        return state, nll

    def window_nll(self, mode: str, ids, state=None, progress=None):
        """NLL `[B, predictions(N)]` of one window `ids` `[B, N]` in `mode`; `memlong` also takes
        and returns the memory state (None: empty memory). `progress(tokens)` is called as
        the window's tokens are processed."""
        progress = progress or (lambda tokens: None)
        self.last_compile_seconds = 0.0
        if mode == "memlong":
            return self._memlong_window(np.asarray(ids, np.int32), state, progress)
        ids = jnp.asarray(ids, jnp.int32)
        if mode == "block":
            if self.block is None:
                raise UserError("the block mode needs block memory settings")
            return state, self._block_window(ids, progress)
        if mode not in MODES:
            raise UserError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        seen = ids[:, -self.protocol.final_window(ids.shape[1]):] if mode == "local" else ids
        nll = jax.block_until_ready(
            self._compiled((mode, seen.shape[1]), self._plain_nll, self.params, seen)(
                self.params, seen))
        progress(ids.shape[1])
        return state, nll


@dataclasses.dataclass
class Aggregate:
    """Per (length, mode): window-mean NLLs and pooled token NLL."""

    window_means: list = dataclasses.field(default_factory=list)
    nll_sum: float = 0.0
    predictions: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0
    tokens: int = 0

    def add(self, nll: np.ndarray, seconds: float, compile_seconds: float, tokens: int) -> None:
        self.window_means.append(float(nll.mean()))
        self.nll_sum += float(nll.astype(np.float64).sum())
        self.predictions += nll.size
        self.seconds += seconds
        self.compile_seconds += compile_seconds
        self.tokens += tokens

    def row(self) -> dict:
        return {"windows": len(self.window_means),
                "predictions_per_window": self.predictions // max(len(self.window_means), 1),
                "ppl": math.exp(float(np.mean(self.window_means))),
                "token_ppl": math.exp(self.nll_sum / self.predictions),
                "mean_nll": float(np.mean(self.window_means)),
                "seconds": self.seconds,
                "compile_seconds": self.compile_seconds,
                "tokens_per_s": self.tokens / self.seconds if self.seconds else None}


def evaluate(scorer: Scorer, documents, modes, bar=None, warn=None) -> dict:
    """Score every window of every (name, ids) document at every length in every mode.

    Returns {"rows": [...per (length, mode)], "windows": [...per window and mode]}; `bar` is a
    tqdm-like progress bar (`set_description`, `update(tokens)`); `warn` gets a message for
    each document too short for a length."""
    protocol = scorer.protocol
    rows, windows = [], []
    for length in protocol.lengths:
        aggregates = {mode: Aggregate() for mode in modes}
        state = None
        for name, ids in documents:
            starts = protocol.window_starts(len(ids), length)
            if not starts and warn:
                warn(f"{name}: {len(ids)} tokens, too short for length {length} "
                     f"(minimum document length {protocol.min_doc_tokens}); skipped")
            for start in starts:
                window = np.asarray(ids[start:start + length])[None]
                for mode in modes:
                    if bar is not None:
                        bar.set_description(f"{mode} {length}")
                    begin = time.perf_counter()
                    carried = state if protocol.carry_memory else None
                    new_state, nll = scorer.window_nll(mode, window, carried,
                                                       bar.update if bar is not None else None)
                    nll = np.asarray(nll)[0]
                    state = new_state if mode == "memlong" else state
                    compile_s = scorer.last_compile_seconds
                    seconds = time.perf_counter() - begin - compile_s
                    aggregates[mode].add(nll, seconds, compile_s, length)
                    windows.append({"document": name, "start": int(start), "length": length,
                                    "mode": mode, "mean_nll": float(nll.mean())})
        for mode, aggregate in aggregates.items():
            if aggregate.window_means:
                rows.append({"length": length, "mode": mode, **aggregate.row()})
    return {"rows": rows, "windows": windows}
