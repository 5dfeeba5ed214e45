"""Per-chunk causal retrieval (`query_mode=chunk`) and continuation chunks: no leakage, the same
as `causal` on a one-chunk window, a slow explicit loop (numpy top-k, one chunk at a time through
a KV cache), the successors continuation picks, per-chunk memory in blockwise attention, and
generation's numbers against scoring."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memlong_jax.eval import generation
from memlong_jax.llama.attention import KVCache, MemoryKV, blockwise_causal_attention, causal_mask, \
    grouped_attention, with_memory
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.memlong import memory as mem_ops
from memlong_jax.memlong import scan
from memlong_jax.presets import PRESETS

from helpers import random_token_ids, reference_score, sharp_params

CFG = PRESETS["tiny"].model
MCFG = PRESETS["tiny"].memlong.validate(CFG).replace(query_mode="chunk")  # tau 4, 8 slots, k 2
MODULE = LlamaForCausalLM(CFG)
MODES = [dict(query_mode="chunk"), dict(query_mode="chunk", continuation=True, top_k=4),
         dict(query_mode="causal", continuation=True, top_k=4),
         dict(query_mode="chunk", continuation=True, previous=True, top_k=6)]


@pytest.fixture(scope="module")
def params():
    return sharp_params(MODULE)


def random_ids(seed, batch=2, length=40):
    return random_token_ids(seed, CFG.vocab_size, batch, length)


@functools.partial(jax.jit, static_argnames=("mcfg", "window"))
def score(params, ids, mcfg, window=16):
    state = scan.init_state(MODULE, mcfg, ids.shape[0])
    return reference_score(MODULE, mcfg, params, state, ids, window, prefix_nll=True)[:2]


@pytest.mark.parametrize("change", MODES, ids=["chunk", "chunk+continuation",
                                               "causal+continuation", "chunk+both neighbours"])
def test_no_leakage(params, change):
    """Changing the tokens after t never changes the NLL of predictions up to t (window of 16
    tokens = 4 query chunks, so t inside the window also moves the later chunks' queries)."""
    mcfg = MCFG.replace(**change)
    ids = random_ids(7)
    for t in (9, 25, 26, 29, 33, 36):
        changed = ids.at[:, t + 1:].set(random_ids(100 + t)[:, t + 1:])
        before = np.asarray(score(params, ids, mcfg)[1])
        after = np.asarray(score(params, changed, mcfg)[1])
        np.testing.assert_array_equal(before[:, :t], after[:, :t])  # nll[:, i] predicts i+1
        assert not np.array_equal(before[:, t:], after[:, t:])


@pytest.mark.parametrize("continuation", [False, True])
def test_one_chunk_window_equals_causal(params, continuation):
    ids = random_ids(3)
    chunk = MCFG.replace(continuation=continuation, top_k=4)
    causal = chunk.replace(query_mode="causal")
    state_a, a = score(params, ids, chunk, window=4)
    state_b, b = score(params, ids, causal, window=4)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(state_a.memory.hits),
                                  np.asarray(state_b.memory.hits))
    # and a longer window differs: each of its chunks retrieves for itself
    assert np.abs(np.asarray(score(params, ids, chunk)[1])
                  - np.asarray(score(params, ids, causal)[1])).max() > 1e-3


# ---- the slow reference ------------------------------------------------------------------------

def slow_top_k(emb, valid, insert_time, query, k, continuation, previous=False):
    """Slots of one row's memory for one query, by (score desc, slot asc); with neighbours the
    first k - kinds * (k // (kinds + 1)) by score, then the successor (insert time + 1, valid,
    not yet picked) of each of the best k // (kinds + 1), then their predecessors (- 1).
    Returns a list of slots (missing neighbours left out)."""
    kinds = int(continuation) + int(previous)
    follow = k // (kinds + 1) if kinds else 0
    scored = sorted((-float(np.dot(emb[s], query)), s) for s in range(len(valid)) if valid[s])
    picked = [s for _, s in scored[:k - kinds * follow]]
    best = picked[:follow]
    for step, on in ((1, continuation), (-1, previous)):
        for s in best if on else []:
            near = [t for t in range(len(valid)) if valid[t] and insert_time[t] == insert_time[s] + step]
            if near and near[0] not in picked:
                picked.append(near[0])
    return picked


def slow_window_nll(params, mcfg, state, window_ids):
    """The window chunk by chunk through a KV cache: chunk j's top-k chosen in numpy with the
    embedding of chunk j-1 (the carried one for j = 0), its K/V gathered by hand, shared by
    that chunk's tokens only. Returns (nll `[B, S-1]`, hits added per slot)."""
    tau, (batch, length) = mcfg.chunk_size, window_ids.shape
    apply = functools.partial(MODULE.apply, {"params": params})
    x = np.asarray(scan.lower_stack(MODULE, mcfg, params, window_ids)[2], np.float64)
    pooled = x.reshape(batch, -1, tau, x.shape[-1]).mean(axis=2)
    pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
    mem = jax.device_get(state.memory)
    kv_shape = (batch, length, CFG.num_key_value_heads, CFG.head_dim)
    caches = tuple(KVCache.empty(batch, length, *kv_shape[2:], jnp.float32)
                   for _ in range(CFG.num_hidden_layers))
    logits, hits = [], np.zeros_like(mem.hits)
    for j in range(length // tau):
        keys = np.zeros((batch, mcfg.top_k * tau) + kv_shape[2:], np.float32)
        values, valid = np.zeros_like(keys), np.zeros((batch, mcfg.top_k * tau), bool)
        for b in range(batch):
            query = np.asarray(state.last_emb[b]) if j == 0 else pooled[b, j - 1]
            if j == 0 and not state.has_last[b]:
                continue
            for i, s in enumerate(slow_top_k(mem.emb[b], mem.valid[b], mem.insert_time[b],
                                             query, mcfg.top_k, mcfg.continuation,
                                             mcfg.previous)):
                keys[b, i * tau:(i + 1) * tau] = mem.keys[b, s]
                values[b, i * tau:(i + 1) * tau] = mem.values[b, s]
                valid[b, i * tau:(i + 1) * tau] = True
                hits[b, s] += 1
        h = apply(window_ids[:, j * tau:(j + 1) * tau], method=MODULE.embed)
        h, caches = apply(h, caches, j * tau, 0, CFG.num_hidden_layers,
                          MemoryKV(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(valid)),
                          mcfg.retrieval_layers, method=MODULE.extend_layers)
        logits.append(apply(h, method=MODULE.final))
    logits = jnp.concatenate(logits, axis=1)
    return np.asarray(scan.token_nll(logits[:, :-1], window_ids[:, 1:])), hits


@pytest.mark.parametrize("continuation,previous", [(False, False), (True, False), (True, True)])
def test_equals_a_slow_loop_over_query_chunks(params, continuation, previous):
    """11 prefix chunks into 8 slots (eviction, so some neighbours are gone), then a 16-token
    window in 4 query chunks."""
    mcfg = MCFG.replace(continuation=continuation, previous=previous, top_k=4,
                        eviction="fifo_half")
    ids = random_ids(11, length=60)
    state = scan.ingest_prefix(MODULE, mcfg, params, scan.init_state(MODULE, mcfg, 2),
                                  ids[:, :44])
    assert not np.asarray(state.memory.valid).all()   # eviction left holes
    _, got = jax.jit(functools.partial(scan.score_sequence, MODULE, mcfg),
                     static_argnames="window")(params, state, ids[:, 44:], window=16)
    want, hits = slow_window_nll(params, mcfg, state, ids[:, 44:])
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    # hits before the window's own chunks are written (writing evicts)
    after, _ = jax.jit(functools.partial(scan.read_step, MODULE, mcfg))(params, state,
                                                                       ids[:, 44:])
    np.testing.assert_array_equal(np.asarray(after.memory.hits - state.memory.hits), hits)
    assert hits.sum() > 2 * 4 * (mcfg.top_k // 2)     # several chunks picked per query chunk


@pytest.mark.parametrize("continuation,previous", [(True, False), (False, True), (True, True)])
def test_neighbours_are_exactly_the_successors_and_predecessors(params, continuation, previous):
    """Random embeddings and a memory with evicted slots, many queries: the picks equal the
    slow reference, in order, and some neighbours are missing (evicted, newest or oldest)."""
    mcfg = MCFG.replace(continuation=continuation, previous=previous, top_k=6,
                        memory_tokens=48)   # 12 slots
    rng = np.random.default_rng(0)
    state = scan.init_state(MODULE, mcfg, 3, 8)
    emb = rng.normal(size=(3, 20, 8)).astype(np.float32)
    zeros = jnp.zeros((3, 20, 4, CFG.num_key_value_heads, CFG.head_dim))
    memory = mem_ops.write_chunks(state.memory, zeros, zeros, jnp.asarray(emb), "paper")
    queries = rng.normal(size=(3, 5, 8)).astype(np.float32)
    indices, found = jax.jit(jax.vmap(lambda q: scan.select_chunks(mcfg, memory, q),
                                      in_axes=1, out_axes=1))(jnp.asarray(queries))
    mem, missing = jax.device_get(memory), 0
    for b in range(3):
        for q in range(5):
            want = slow_top_k(mem.emb[b], mem.valid[b], mem.insert_time[b], queries[b, q], 6,
                              continuation, previous)
            got = np.asarray(indices[b, q])[np.asarray(found[b, q])].tolist()
            assert got == want
            missing += 6 - len(want)
    assert missing > 0


# ---- attention with per-chunk memory ---------------------------------------------------------

def per_chunk_memory(seed, batch, n, slots, kv_heads, head_dim=16):
    kk, kv, km = jax.random.split(jax.random.PRNGKey(seed), 3)
    return MemoryKV(2.0 * jax.random.normal(kk, (batch, n, slots, kv_heads, head_dim)),
                    jax.random.normal(kv, (batch, n, slots, kv_heads, head_dim)),
                    jax.random.uniform(km, (batch, n, slots)) < 0.7)


@pytest.mark.parametrize("length,block,tau", [(64, 16, 8), (48, 32, 16), (40, 16, 8)])
def test_blockwise_per_chunk_memory_equals_a_loop_over_chunks(length, block, tau):
    """Blockwise attention with one memory per query chunk equals, chunk by chunk, dense
    attention of that chunk's queries with that chunk's memory shared."""
    q, k, v = (2.0 * jax.random.normal(jax.random.PRNGKey(i), (2, length, h, 16))
               for i, h in ((1, 6), (2, 2), (3, 2)))
    memory = per_chunk_memory(4, 2, length // tau, 12, 2)
    got = jax.jit(blockwise_causal_attention, static_argnums=3)(q, k, v, block, memory)
    dense = jnp.concatenate([
        grouped_attention(q[:, j * tau:(j + 1) * tau], *with_memory(
            k[:, :(j + 1) * tau], v[:, :(j + 1) * tau], causal_mask(tau, (j + 1) * tau),
            jax.tree_util.tree_map(lambda a: a[:, j], memory), tau))
        for j in range(length // tau)], axis=1)
    np.testing.assert_allclose(got, dense, atol=1e-5, rtol=1e-5)
    keys, values, mask = with_memory(k, v, causal_mask(length, length), memory)
    np.testing.assert_allclose(grouped_attention(q, keys, values, mask), dense, atol=1e-5,
                               rtol=1e-5)
    shared = blockwise_causal_attention(q, k, v, block,
                                        jax.tree_util.tree_map(lambda a: a[:, 0], memory))
    assert np.abs(np.asarray(shared) - np.asarray(dense)).max() > 1e-2


# ---- generation ------------------------------------------------------------------------------

@pytest.mark.parametrize("continuation", [False, True])
def test_decode_equals_scoring(params, continuation):
    """Memory of 28 tokens (7 chunks), then a 5-token prompt and 11 fed tokens: decoding
    crosses two chunk boundaries (refreshes at slots 8 and 12), and every prediction of the
    16-token window equals score_sequence's on the same 44 tokens, hit counts included."""
    mcfg = MCFG.replace(continuation=continuation, top_k=4, memory_tokens=64)
    ids = np.asarray(random_ids(21, length=44), np.int32)
    memory = scan.ingest_prefix(MODULE, mcfg, params, scan.init_state(MODULE, mcfg, 2),
                                   jnp.asarray(ids[:, :28]))
    gen_obj = generation.Generator(MODULE, mcfg, 16)
    state, logits = gen_obj.start(params, ids[:, 28:33], memory)
    out = [np.asarray(logits)]
    for t in ids[:, 33:].T:
        state, logits = gen_obj.step(params, state, t)
        out.append(np.asarray(logits))
    score_state = scan.init_state(MODULE, mcfg, 2)
    score_state, _, window_logits = reference_score(
        MODULE, mcfg, params, score_state, jnp.asarray(ids), 16)
    np.testing.assert_allclose(np.stack(out, 1), np.asarray(window_logits)[:, 4:], atol=1e-4,
                               rtol=0)
    np.testing.assert_array_equal(np.asarray(state.memlong.memory.hits),
                                  np.asarray(score_state.memory.hits))


def test_generation_refreshes_after_spills(params):
    """Past the window: spills move chunks into memory and each new chunk retrieves again; a
    run is deterministic and its last chunk's picks equal a direct retrieval."""
    mcfg = MCFG.replace(memory_tokens=64)
    gen_obj = generation.Generator(MODULE, mcfg, 16)
    ids = np.asarray(random_ids(22, length=60), np.int32)
    state, _ = gen_obj.start(params, ids[:, :30])
    for t in ids[:, 30:].T:
        state, _ = gen_obj.step(params, state, t)
    assert int(state.memlong.memory.clock.max()) > 28 // 4     # spills wrote chunks
    length = int(state.length)
    x = np.asarray(state.mem_x)[:, (length - 1) // 4 * 4 - 4:(length - 1) // 4 * 4]
    query = scan.pooled_chunks(jnp.asarray(x), 4)[:, 0]
    indices, found = scan.select_chunks(mcfg, state.memlong.memory, query)
    picked = scan.retrieved_kv(state.memlong.memory, indices, found)
    np.testing.assert_array_equal(np.asarray(state.retrieved.keys), np.asarray(picked.keys))
