"""The k demonstrations every item of a (task, seed, k) starts with, run once and reused.

Every prompt of a seed begins with the same k demonstrations (tokenised with the query as one
string, so the shared part is found on the token ids: the longest common prefix of the
windows). The prefix goes through the whole stack once (`run_prefix`), giving each layer's
local KV cache of its tokens. Then for each item only its own tokens run:

- no memory (`local`; `memlong` with m = 0): through every layer against the cached prefix
  (`extend_local`);
- with memory (`memlong`): the layers below the memory layer never see memory, so the item's
  tokens run there against the cached prefix and the prefix's hidden states are reused
  (`lower_stack_after`); from the memory layer up, every token attends to the item's own
  retrieved chunks, so the whole window runs as before.

`full` windows start with the item's own memory demonstrations: they share no prefix.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from memlong_jax.llama.attention import KVCache
from memlong_jax.memlong.config import MemLongConfig


def shared_prefix(windows: list[np.ndarray]) -> int:
    """Tokens at the start of every window, leaving each at least one of its own; 0 when
    that is under half the shortest window (too little to be worth a second path)."""
    shortest = min(len(w) for w in windows)
    n = shortest - 1
    first = windows[0]
    for window in windows[1:]:
        differ = np.flatnonzero(window[:n] != first[:n])
        if differ.size:
            n = int(differ[0])
    return n if 2 * n >= shortest else 0


class Prefix(NamedTuple):
    """A shared prefix, run: its ids `[1, P']` right-padded, how many are real (a traced
    scalar, so prefixes of one padded length share a compilation), each layer's `KVCache` of
    its P' slots and the hidden states entering the memory layer `[1, P', hidden]`."""

    ids: jax.Array
    length: jax.Array
    caches: tuple
    h: jax.Array


def run_prefix(module, mcfg: MemLongConfig, params, ids, length) -> Prefix:
    """The prefix `ids` `[1, P']` (`length` real tokens) through the whole stack."""
    cfg, memory_layer = module.config, mcfg.memory_layer
    lm = module.bind({"params": params})
    empty = tuple(KVCache.empty(1, ids.shape[1], cfg.num_key_value_heads, cfg.head_dim,
                                module.dtype) for _ in range(cfg.num_hidden_layers))
    h, lower = lm.extend_layers(lm.embed(ids), empty[:memory_layer], 0, 0, memory_layer)
    _, upper = lm.extend_layers(h, empty[memory_layer:], 0, memory_layer,
                                cfg.num_hidden_layers)
    return Prefix(ids, length, lower + upper, h)


def _extend(lm, prefix: Prefix, ids, stop: int):
    """Rows `ids` `[B, T]` (right-padded) placed after the prefix, through layers 0..stop-1
    against its caches (grown to P' + T slots): hidden states `[B, T, hidden]`."""
    batch, window = ids.shape[0], prefix.ids.shape[1] + ids.shape[1]
    caches = tuple(c.repeated(batch, window) for c in prefix.caches[:stop])
    return lm.extend_layers(lm.embed(ids), caches, prefix.length, 0, stop)[0]


def extend_local(module, params, prefix: Prefix, ids, head_at):
    """Logits `[B, P, V]` at positions `head_at` `[B, P]` of rows `ids` (counted from the
    first token after the prefix) with no memory: every layer against the cached prefix."""
    lm = module.bind({"params": params})
    h = _extend(lm, prefix, ids, module.config.num_hidden_layers)
    return lm.final(jnp.take_along_axis(h, head_at[..., None], axis=1))


def lower_stack_after(module, mcfg: MemLongConfig, params, prefix: Prefix, ids):
    """`scan.lower_stack` of the windows prefix + `ids` `[B, T]`, with only `ids` run: returns
    (the windows' ids `[B, P' + T]`, lower_stack's output for them). Each window's tokens sit
    at 0..length+T-1 (the prefix's padding overwritten); what follows is padding."""
    lm = module.bind({"params": params})
    batch, length = ids.shape[0], prefix.length
    h = _extend(lm, prefix, ids, mcfg.memory_layer)
    place = lambda shared, own: jax.lax.dynamic_update_slice_in_dim(
        jnp.repeat(jnp.pad(shared, [(0, 0), (0, own.shape[1])] + [(0, 0)] * (own.ndim - 2)),
                   batch, axis=0), own.astype(shared.dtype), length, axis=1)
    windows, h = place(prefix.ids, ids), place(prefix.h, h)
    positions = jnp.broadcast_to(jnp.arange(1, windows.shape[1] + 1), windows.shape)
    x, keys, values = lm.memory_kv(h, mcfg.memory_layer)
    return windows, (positions, h, x, keys, values)
