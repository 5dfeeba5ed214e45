"""Running recall items through a model in each row: `memlong:<query mode>`, `local`, `full`,
`block`.

- Answers (passkey, needle): the prompt's last `window - budget` tokens are the local KV cache
  and the answer's `budget` tokens fit in the window after them, so nothing spills while
  answering. `memlong`: the prompt's head (`length - window` tokens) goes into memory through
  `scan.ingest_prefix` as generation does, then `generation.Generator.start` with that
  memory and `Generator.step` for each new token. `local`: the same tail, no memory. `full`:
  the whole prompt, plain causal attention (prefilled with the blockwise forward, then decoded
  with the generation cache). `block`: the whole prompt through block memory
  (`block_generation.BlockGenerator`), then decoded in it. Greedy decoding gives the generated
  answer; teacher forcing the expected answer gives its log-probability.
- NLL (repeat): `scoring.Scorer` on the final window (memlong, with the same memory), the last
  window alone (local), the whole sequence (full) or the whole sequence through block memory.

The head's memory is built once per item and shared by the query-mode rows: ingestion writes
the same chunks in every mode (only hit counts differ, which matter to eviction alone), so it is
shared only while the head fits in memory without eviction; past that, each mode builds its own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from memlong_jax.eval import generation, scoring
from memlong_jax.eval.block_generation import BlockGenerator
from memlong_jax.memlong.blockmem import BlockConfig
from memlong_jax.memlong import scan
from memlong_jax.memlong.config import MemLongConfig
from memlong_jax.memlong.retrievers import Retriever, make_retriever
from memlong_jax.llama.model import LlamaForCausalLM

PLAIN_ROWS = ("local", "full")


@functools.partial(jax.jit, static_argnames=("module", "mcfg", "capacity"))
def plain_start(module: LlamaForCausalLM, mcfg: MemLongConfig, capacity: int, params, ids):
    """Plain causal forward over `ids` `[B, n]` (local positions 1..n, as the generation cache)
    that fills an empty-memory generation state of `capacity` slots -> (state, logits `[B, V]` of
    the next token). Decoding on from it (`generation.decode`) is plain attention."""
    batch, n = ids.shape
    apply = functools.partial(module.apply, {"params": params})
    gen = generation.init_state(module, mcfg, scan.init_state(module, mcfg, batch), capacity)
    positions = jnp.broadcast_to(jnp.arange(1, n + 1), ids.shape)
    into_slots = lambda buf, a: buf.at[:, :n].set(a.astype(buf.dtype))
    h = apply(ids, method=module.embed)
    cache = []
    for layer, layer_cache in enumerate(gen.cache):
        _, k, v = apply(h, layer, method=module.memory_kv)
        cache.append(layer_cache.write(k, v, 0, *gen.rope))
        h = apply(h, positions, layer, layer + 1, method=module.run_layers)
    logits = apply(h[:, -1:], method=module.final)[:, 0]
    return gen._replace(cache=tuple(cache), ids=into_slots(gen.ids, ids),
                        length=jnp.asarray(n, jnp.int32)), logits


def _log_softmax_at(logits, tokens) -> np.ndarray:
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, None], axis=-1)[:, 0])


class Reader:
    """One model, its MemLong settings, local window and block memory settings (`block` row);
    the rows' jitted pieces are cached."""

    def __init__(self, model, mcfg: MemLongConfig, encoder, window: int, budget: int,
                 block: BlockConfig | None = None):
        generation.check_window(mcfg, window)
        self.module, self.params, self.tokenizer = model.module, model.params, model.tokenizer
        self.mcfg, self.encoder, self.window, self.budget = mcfg, encoder, window, budget
        self.block = block
        self._block_generator = None if block is None else BlockGenerator(self.module, block)
        self.plain_mcfg = mcfg.replace(retriever="hidden")   # reads no memory: no encoder
        self._scorers: dict = {}
        self._generators: dict = {}
        self._ingesters: dict = {}

    def retriever(self, mcfg: MemLongConfig) -> Retriever:
        return make_retriever(mcfg, self.tokenizer, self.encoder)

    def mode_config(self, query_mode: str) -> MemLongConfig:
        return self.mcfg.replace(query_mode=query_mode).validate(self.module.config)

    def scorer(self, mcfg: MemLongConfig, protocol: scoring.Protocol,
               block: BlockConfig | None = None) -> scoring.Scorer:
        key = (mcfg, protocol, block)
        if key not in self._scorers:
            self._scorers[key] = scoring.Scorer(self.module, self.params, mcfg, protocol,
                                                self.retriever(mcfg), block)
        return self._scorers[key]

    def head_tokens(self, length: int) -> int:
        return max(0, length - self.window)

    def shares_memory(self, length: int) -> bool:
        """Whether one ingested head serves every query mode (no eviction while ingesting)."""
        return self.head_tokens(length) <= self.mcfg.memory_tokens

    def memory(self, head_ids, query_mode: str | None = None) -> scan.MemLongState:
        """The memory after ingesting `head_ids` `[B, n*tau]`, in blocks from the host."""
        mcfg = self.mcfg if query_mode is None else self.mode_config(query_mode)
        scorer = self.scorer(mcfg, scoring.Protocol((self.window,), self.window, self.window))
        if mcfg not in self._ingesters:
            self._ingesters[mcfg] = jax.jit(functools.partial(
                scan.ingest_prefix, self.module, mcfg, window=self.window))
        ingest = self._ingesters[mcfg]
        state = scorer.empty_state(head_ids.shape[0])
        block = scoring.host_block_tokens(mcfg, self.window)
        for start in range(0, head_ids.shape[1], block):
            ids = head_ids[:, start:start + block]
            key_emb = scorer.retriever.chunk_keys(ids)
            queries = scorer.retriever.prefix_queries(mcfg, ids, self.window)
            context = scoring.overlap_context(mcfg, head_ids[:, :start] if start else None)
            state = jax.block_until_ready(ingest(self.params, state, jnp.asarray(ids), key_emb,
                                                 segment_queries=queries,
                                                 context=None if context is None
                                                 else jnp.asarray(context)))
        return state

    def _generator(self, query_mode: str) -> generation.Generator:
        if query_mode not in self._generators:
            mcfg = self.mode_config(query_mode)
            self._generators[query_mode] = generation.Generator(
                self.module, mcfg, self.window, self.retriever(mcfg))
        return self._generators[query_mode]

    def start(self, row: str, prompts: np.ndarray, memory=None):
        """(state, first logits, step function) for prompts `[B, P]` in `row`."""
        if row == "block":
            gen, logits = self._block_generator.start(self.params, prompts)
            return gen, logits, functools.partial(self._block_generator.step, self.params)
        if row == "full":
            capacity = -(-(prompts.shape[1] + self.budget) // self.mcfg.chunk_size) \
                * self.mcfg.chunk_size
            gen, logits = plain_start(self.module, self.plain_mcfg, capacity, self.params,
                                      jnp.asarray(prompts))
        else:
            tail = prompts[:, -(self.window - self.budget):]
            if row == "local":
                gen, logits = plain_start(self.module, self.plain_mcfg, self.window, self.params,
                                          jnp.asarray(tail))
            else:
                generator = self._generator(row.split(":", 1)[1])
                gen, logits = generator.start(self.params, tail, memory)
                return gen, logits, functools.partial(generator.step, self.params)
        return gen, logits, functools.partial(generation.decode, self.module, self.plain_mcfg,
                                              self.params)

    def answers(self, row: str, prompts: np.ndarray, answers: list[np.ndarray], memory=None):
        """Greedy tokens `[B, budget]` and the teacher-forced log-probability `[B]` of each
        expected answer (`answers`: token ids, at most `budget` each)."""
        gen, logits, step = self.start(row, prompts, memory)
        width = max(len(a) for a in answers)
        gold = np.stack([np.pad(a, (0, width - len(a)), mode="edge") for a in answers])
        valid = np.arange(width)[None] < np.asarray([len(a) for a in answers])[:, None]
        # Steps consume (donate) their state; the block row shares its stored blocks.
        forced = (self._block_generator.fork(gen, self.budget - 1) if row == "block"
                  else jax.tree_util.tree_map(jnp.copy, gen))
        logprob = _log_softmax_at(logits, gold[:, 0])
        forced_logits = logits
        for j in range(1, width):
            forced, forced_logits = step(forced, gold[:, j - 1])
            logprob = logprob + np.where(valid[:, j], _log_softmax_at(forced_logits, gold[:, j]), 0)
        greedy = []
        for j in range(self.budget):
            tokens = np.asarray(jnp.argmax(jnp.asarray(logits, jnp.float32), axis=-1),
                                np.int32)
            greedy.append(tokens)
            if j + 1 < self.budget:
                gen, logits = step(gen, tokens)
        return np.stack(greedy, axis=1), logprob

    def nll(self, row: str, ids: np.ndarray, scored: int, memory=None) -> np.ndarray:
        """NLL `[B, scored - 1]` of the last `scored - 1` tokens of `ids` `[B, L]` in `row`."""
        length = ids.shape[1]
        if row in PLAIN_ROWS or row == "block":
            protocol = scoring.Protocol((length,), self.window, scored)
            block = self.block if row == "block" else None
            return np.asarray(self.scorer(self.plain_mcfg, protocol, block).window_nll(row,
                                                                                      ids)[1])
        protocol = scoring.Protocol((self.window,), self.window, scored)
        scorer = self.scorer(self.mode_config(row.split(":", 1)[1]), protocol)
        return np.asarray(scorer.window_nll("memlong", ids[:, -self.window:], memory)[1])
