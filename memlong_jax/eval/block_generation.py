"""Generation with block memory: a prompt of any length goes through `blockmem` chunk by chunk,
then tokens are decoded one at a time into the pending chunk; every full chunk is committed
(its oldest window blocks go to memory and the next chunk's blocks are selected with its
queries), so the blocks a token reads are refreshed once per chunk.

Before the prompt's last token, the blocks are selected again with the queries of the prompt's
last partial chunk (`blockmem.reselect`): the question at the end of a prompt picks the blocks
its answer reads. Only tokens already fed take part in any choice.

Feeding tokens without a commit never writes the stored blocks (the state's largest part, the
K/V of every block in memory), so `extend` runs without them and two continuations of one prompt
(`fork`) share them until a commit.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from memlong_jax.errors import UserError
from memlong_jax.eval.generation import TokenStream
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.memlong import blockmem


@dataclasses.dataclass
class BlockGenerator(TokenStream):
    """`start` / `step` (and `tokens`, the sampling loop) for one model and block settings."""

    module: LlamaForCausalLM
    bcfg: blockmem.BlockConfig

    def __post_init__(self):
        self.bcfg.validate(self.module.config)
        partial = lambda fn, **kw: jax.jit(functools.partial(fn, self.module, self.bcfg), **kw)
        self._chunks = partial(blockmem.score_chunks, donate_argnums=(1,))
        self._extend_unstored = partial(blockmem.extend, donate_argnums=(1,))
        self._commit = partial(blockmem.commit, donate_argnums=(0,))
        self._reselect = partial(blockmem.reselect, donate_argnums=(0,))

    def start(self, params, prompt_ids):
        """Prompt `[B, P]` (P >= 1) -> (state, logits `[B, V]` for the first new token)."""
        ids = np.asarray(prompt_ids)
        if ids.ndim != 2 or not ids.shape[1] or not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"prompt ids must be a non-empty int array [B, P], got {ids.dtype} "
                            f"{ids.shape}")
        ids = jnp.asarray(ids, jnp.int32)
        chunk = self.bcfg.chunk
        whole = (ids.shape[1] - 1) // chunk * chunk   # the rest (1..chunk tokens) stays pending
        state = blockmem.init_state(self.module, self.bcfg, ids.shape[0])
        if whole:
            state, _ = self._chunks(params, state, ids[:, :whole])
        if ids.shape[1] - 1 > whole:
            state, _ = self._extend(params, state, ids[:, whole:-1])
            state = self._reselect(state)
        return self.step(params, state, ids[:, -1])

    def _extend(self, params, state: blockmem.BlockState, ids):
        """`blockmem.extend` on everything but the stored blocks (they pass through untouched,
        neither copied nor donated)."""
        extended, logits = self._extend_unstored(params, _unstored(state), ids)
        return _restored(extended, state), logits

    def step(self, params, state: blockmem.BlockState, tokens):
        """Feed one token per row -> (state, next-token logits `[B, V]`); a full chunk is
        committed first. `state` is consumed (its buffers are donated)."""
        if int(state.fill) == self.bcfg.chunk:
            state = self._commit(state)
        state, logits = self._extend(params, state, jnp.asarray(tokens, jnp.int32)[:, None])
        return state, logits[:, -1]

    def fork(self, state: blockmem.BlockState, steps: int) -> blockmem.BlockState:
        """A copy of `state` to continue apart from it for at most `steps` steps each (e.g.
        teacher-forced next to greedy). When neither can reach a commit in `steps` steps the
        stored blocks are shared, not copied: at 128k tokens they are gigabytes."""
        copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
        if int(state.fill) + steps > self.bcfg.chunk:
            return copy(state)
        return _restored(copy(_unstored(state)), state)


def _unstored(state: blockmem.BlockState) -> blockmem.BlockState:
    """`state` without its stored blocks."""
    return state._replace(keys=None, values=None)


def _restored(state: blockmem.BlockState, source: blockmem.BlockState) -> blockmem.BlockState:
    """`state` with the stored blocks of `source`."""
    return state._replace(keys=source.keys, values=source.values)
