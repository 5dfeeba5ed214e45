"""Block memory (`blockmem`): full attention when nothing is left out, no leakage, selection and
representatives against slow loops, decoding equal to chunked scoring, settings checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_token_ids, sharp_params
from memlong_jax.memlong import blockmem
from memlong_jax.memlong import memory as mem_ops
from memlong_jax.eval.block_generation import BlockGenerator
from memlong_jax.llama.config import ConfigError
from memlong_jax.llama.layers import apply_rope, rope_cos_sin
from memlong_jax.memlong.scan import token_nll
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.presets import PRESETS
from memlong_jax.settings import apply_overrides

CFG = PRESETS["tiny"].model   # 4 layers, 4 heads, 2 KV heads, head_dim 16
MODULE = LlamaForCausalLM(CFG)
SMALL = blockmem.BlockConfig(block_size=4, sink_tokens=2, window=8, chunk=4, top_k=2,
                             representatives=2, memory_tokens=16, mem_dtype="float32")


@pytest.fixture(scope="module")
def params():
    return sharp_params(MODULE)


def random_ids(seed, batch=2, length=48):
    return random_token_ids(seed, CFG.vocab_size, batch, length)


def next_targets(ids):
    return jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)


@functools.partial(jax.jit, static_argnames=("bcfg",))
def block_scored(params, ids, bcfg=SMALL):
    """(state, nll of every position) after whole chunks `ids` from an empty memory."""
    state = blockmem.init_state(MODULE, bcfg, ids.shape[0])
    return blockmem.score_chunks(MODULE, bcfg, params, state, ids, next_targets(ids))


def block_nll(params, ids, bcfg=SMALL):
    return block_scored(params, ids, bcfg)[1][:, :-1]


def full_nll(params, ids):
    return np.asarray(token_nll(MODULE.apply({"params": params}, ids), next_targets(ids)))[:, :-1]


@pytest.mark.parametrize("sinks, window, chunk", [(2, 8, 4), (3, 16, 8)])
def test_every_block_at_true_positions_is_full_attention(params, sinks, window, chunk):
    """Memory holding every block, top-k covering all of them, true positions: each token sees
    exactly its causal prefix once (sinks, memory, window, chunk), so the NLL is the full
    model's. fp32; the joint softmax only reorders sums, hence 2e-5."""
    bcfg = SMALL.replace(sink_tokens=sinks, window=window, chunk=chunk, top_k=16,
                         memory_tokens=64, placement="true", previous=False)
    ids = random_ids(1)
    np.testing.assert_allclose(np.asarray(block_nll(params, ids, bcfg)), full_nll(params, ids),
                               atol=2e-5)


def test_fixed_placement_and_few_blocks_change_the_result(params):
    """The default mode is not full attention in disguise: the first chunk (nothing before it)
    is the full model's, later ones see the sinks and blocks at position 0 and differ."""
    ids = random_ids(2)
    nll, full = np.asarray(block_nll(params, ids)), full_nll(params, ids)
    np.testing.assert_allclose(nll[:, :SMALL.chunk - 1], full[:, :SMALL.chunk - 1], atol=2e-5)
    assert np.abs(nll - full)[:, SMALL.chunk:].min(axis=0).max() > 1e-2


@pytest.mark.parametrize("cut, previous", [(13, False), (24, False), (37, False), (24, True)])
def test_no_leak_from_later_tokens(params, cut, previous):
    """Changing the tokens from position `cut` on never changes the NLL of earlier predictions
    (block choice, representatives, hit counts and eviction all lag behind), but does change
    later ones. Memory holds 4 blocks, so eviction runs."""
    ids = random_ids(3)
    bcfg = SMALL.replace(previous=previous)
    changed = ids.at[:, cut:].set(random_ids(4)[:, cut:])
    before, after = (np.asarray(block_nll(params, x, bcfg)) for x in (ids, changed))
    np.testing.assert_array_equal(before[:, :cut - 1], after[:, :cut - 1])
    assert np.abs(before - after)[:, cut:].max() > 1e-3


def test_representatives_equal_a_loop():
    rng = np.random.default_rng(0)
    size, count, kv, heads, dim = 4, 2, 2, 4, 16
    q = rng.normal(size=(2, 8, heads, dim)).astype(np.float32)
    k = rng.normal(size=(2, 8, kv, dim)).astype(np.float32)
    got = np.asarray(blockmem.block_representatives(jnp.asarray(q), jnp.asarray(k), size, count,
                                                    CFG.rope_theta))
    cos, sin = (np.asarray(a)[0] for a in rope_cos_sin(jnp.arange(size)[None], dim,
                                                       CFG.rope_theta))
    rot = lambda x: x * cos[:, None] + np.concatenate([-x[..., dim // 2:], x[..., :dim // 2]],
                                                      -1) * sin[:, None]
    for b in range(2):
        for block in range(2):
            qs, ks = (x[b, block * size:(block + 1) * size] for x in (q, k))
            qr, kr = rot(qs), rot(ks)
            for g in range(kv):
                received = np.zeros(size)
                for h in range(g * heads // kv, (g + 1) * heads // kv):
                    for t in range(size):
                        s = np.array([qr[t, h] @ kr[j, g] / np.sqrt(dim) for j in range(t + 1)])
                        received[:t + 1] += np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                top = np.argsort(-received, kind="stable")[:count]
                np.testing.assert_allclose(got[b, block, g], ks[top, g].mean(0), atol=1e-5)


@pytest.mark.parametrize("top_k, previous", [(3, False), (4, True), (5, True)])
def test_block_selection_equals_a_loop(top_k, previous):
    """Summed-query scoring + top-k picks the blocks that a loop over every query, head and
    valid block would pick by the summed scores q . representative; with `previous`, the top
    k // 2 and, before them, the block written just before each (when held), none twice."""
    rng = np.random.default_rng(1)
    batch, kv, heads, dim, length, size = 2, 2, 4, 16, 8, 4
    bcfg = SMALL.replace(top_k=top_k, memory_tokens=32, previous=previous)
    memory = mem_ops.init_memory(batch * kv, bcfg.capacity_blocks, size, 1, dim, dim,
                                 jnp.float32)
    blocks = 6
    reps = rng.normal(size=(batch * kv, blocks, dim)).astype(np.float32)
    memory = mem_ops.write_chunks(memory, jnp.zeros((batch * kv, blocks, size, 1, dim)),
                                  jnp.zeros((batch * kv, blocks, size, 1, dim)), reps, "paper",
                                  jnp.asarray(rng.random((batch * kv, blocks)) < 0.8))
    q = rng.normal(size=(batch, length, heads, dim)).astype(np.float32)
    positions = 9 + np.arange(length)
    cos, sin = rope_cos_sin(jnp.asarray(positions)[None], dim, CFG.rope_theta)
    query = blockmem.selection_query(jnp.asarray(q), cos, sin, kv)
    _, indices, found = blockmem.select_blocks(bcfg, memory, query.reshape(batch * kv, dim))
    q_rot = np.asarray(apply_rope(jnp.asarray(q), cos, sin))
    valid, emb = np.asarray(memory.valid), np.asarray(memory.emb)
    written = np.asarray(memory.insert_time)
    assert indices.shape == (batch * kv, top_k)
    for b in range(batch):
        for g in range(kv):
            row = b * kv + g
            scores = {}
            for slot in np.flatnonzero(valid[row]):
                scores[slot] = sum(q_rot[b, t, h] @ emb[row, slot] for t in range(length)
                                   for h in range(g * heads // kv, (g + 1) * heads // kv))
            best = sorted(scores, key=lambda s: (-scores[s], s))[:top_k // 2 if previous
                                                                  else top_k]
            if previous:
                before = [s for pick in best for s in scores if written[row, s] ==
                          written[row, pick] - 1]
                best = list(dict.fromkeys(before + best))
            assert list(np.asarray(indices[row])[np.asarray(found[row])]) == best


def test_decoding_token_by_token_equals_chunked_scoring(params):
    """`extend` one token at a time with a `commit` whenever a chunk fills (generation) gives
    the logits of whole-chunk scoring."""
    ids = random_ids(5, length=24)
    state = blockmem.init_state(MODULE, SMALL, 2)
    scored = block_scored(params, ids)[1]
    step = jax.jit(functools.partial(blockmem.extend, MODULE, SMALL))
    commit = jax.jit(functools.partial(blockmem.commit, MODULE, SMALL))
    nll = []
    for t in range(ids.shape[1]):
        state, logits = step(params, state, ids[:, t:t + 1])
        nll.append(token_nll(logits, next_targets(ids)[:, t:t + 1]))
        if int(state.fill) == SMALL.chunk:
            state = commit(state)
    np.testing.assert_allclose(np.concatenate(nll, 1), np.asarray(scored), atol=2e-5)


def test_reselect_uses_only_fed_tokens(params):
    """Reselecting with a partial chunk's queries reads only the tokens fed: the slots beyond
    `fill` hold stale values that must not matter."""
    ids = random_ids(6, length=30)
    state, _ = block_scored(params, ids[:, :28])
    state, _ = jax.jit(functools.partial(blockmem.extend, MODULE, SMALL))(params, state,
                                                                          ids[:, 28:30])
    stale = state._replace(layers=state.layers._replace(
        pend_q=state.layers.pend_q.at[:, :, 2:].set(7.0)))
    reselect = jax.jit(functools.partial(blockmem.reselect, MODULE, SMALL))
    a, b = (reselect(s).layers.tile for s in (state, stale))
    np.testing.assert_array_equal(np.asarray(a.valid), np.asarray(b.valid))
    np.testing.assert_array_equal(np.asarray(a.keys), np.asarray(b.keys))


@pytest.mark.parametrize("steps", [3, 6])
def test_forked_continuations_equal_separate_runs(params, steps):
    """Two continuations of one prompt from `fork` (stored blocks shared when neither reaches a
    commit in `steps` steps, copied when they do) each give the logits of a generator started
    afresh and fed the same tokens."""
    generator = BlockGenerator(MODULE, SMALL)
    prompt = np.asarray(random_ids(8, length=21))   # one token pending after the prompt
    feeds = np.asarray(random_ids(9, batch=4, length=steps)).reshape(2, 2, steps)

    def run(state, tokens):
        out = []
        for t in range(steps):
            state, logits = generator.step(params, state, tokens[:, t])
            out.append(np.asarray(logits))
        return np.stack(out)

    state = generator.start(params, prompt)[0]
    forked = generator.fork(state, steps)
    assert (forked.keys is state.keys) == (1 + steps <= SMALL.chunk)
    got = [run(forked, feeds[1]), run(state, feeds[0])]
    for tokens, logits in zip(feeds[::-1], got):
        np.testing.assert_array_equal(logits, run(generator.start(params, prompt)[0], tokens))


@pytest.mark.parametrize("mem_dtype", ["bfloat16", "float16", "float32"])
def test_stored_blocks_equal_a_loop_of_plain_writes(mem_dtype):
    """`store_blocks` / `load_blocks` (scatter and gather on the bits) write and read what a
    loop of plain writes into a `mem_dtype` array puts there, bit for bit; slots past the
    capacity are not written."""
    rng = np.random.default_rng()
    layers, rows, capacity, size, dim, n = 3, 4, 6, 4, 8, 2
    dtype = jnp.dtype(mem_dtype)
    plain = rng.standard_normal((layers, rows, capacity, size, dim)).astype(dtype)
    stored = mem_ops.float_bits(jnp.asarray(plain))
    store = jax.jit(blockmem.store_blocks, static_argnums=3, donate_argnums=0)
    for _ in range(3):
        slots = np.stack([rng.permutation(capacity + 1)[:n] for _ in range(layers * rows)])
        slots = slots.reshape(layers, rows, n)   # distinct per row; capacity: nothing written
        blocks = rng.standard_normal((layers, rows, n, size, dim)).astype(np.float32)
        for i in np.ndindex(layers, rows, n):
            if slots[i] < capacity:
                plain[i[0], i[1], slots[i]] = blocks[i].astype(dtype)
        stored = store(stored, jnp.asarray(slots), jnp.asarray(blocks), mem_dtype)
        indices = rng.integers(0, capacity, (layers, rows, 3))
        loaded = np.asarray(blockmem.load_blocks(stored, jnp.asarray(indices), mem_dtype))
        expected = np.stack([plain[l, r, indices[l, r]] for l, r in np.ndindex(layers, rows)])
        assert loaded.dtype == dtype
        assert loaded.tobytes() == expected.reshape(loaded.shape).tobytes()
    assert np.asarray(stored).tobytes() == plain.tobytes()


def test_a_chunk_does_not_convert_the_whole_memory(params):
    """XLA:CPU computes a scatter into a bf16 buffer in float32, converting the whole memory up
    and back for every chunk; `score_chunks` must compile to in-place updates of the bits."""
    bcfg = SMALL.replace(mem_dtype="bfloat16", memory_tokens=64)
    state = blockmem.init_state(MODULE, bcfg, 2)
    compiled = jax.jit(functools.partial(blockmem.score_chunks, MODULE, bcfg),
                       donate_argnums=(1,)).lower(params, state, random_ids(0, length=16)) \
        .compile().as_text()
    whole = "[" + ",".join(map(str, state.keys.shape)) + "]"
    converts = [line for line in compiled.splitlines() if whole in line and " convert(" in line]
    assert "scatter" in compiled and not converts, converts


@pytest.mark.parametrize("change, words", [
    (dict(window=6), "multiple of block_size"),
    (dict(chunk=16), "must not exceed the window"),
    (dict(top_k=5), "at least top_k"),
    (dict(representatives=5), "representatives"),
    (dict(placement="wherever"), "placement must be one of"),
    (dict(sink_tokens=-1), "sink_tokens must be an integer >= 0"),
    (dict(window=2044, block_size=4), "trained range"),
])
def test_bad_settings_are_config_errors(change, words):
    with pytest.raises(ConfigError, match=words):
        SMALL.replace(**change).validate(CFG)


def test_overrides_parse_by_field_type():
    bcfg = apply_overrides(SMALL, ["top_k=3", "placement=true"])
    assert (bcfg.top_k, bcfg.placement) == (3, "true")
    with pytest.raises(ConfigError, match="unknown setting 'depth'"):
        apply_overrides(SMALL, ["depth=3"])


@pytest.mark.slow   # CI time: a cheaper test covers the same property in the default run
def test_generation_with_every_block_is_the_full_model(params):
    """Greedy block-memory generation (prompt in chunks, reselection, token steps, commits)
    with every block retrieved at true positions continues the prompt as the plain model does,
    logit for logit."""
    bcfg = SMALL.replace(top_k=16, memory_tokens=64, placement="true", previous=False)
    prompt = np.asarray(random_ids(7, length=23))
    generator = BlockGenerator(MODULE, bcfg)
    state, logits = generator.start(params, prompt)
    ids = prompt
    for _ in range(10):
        expected = np.asarray(MODULE.apply({"params": params}, jnp.asarray(ids)))[:, -1]
        np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4)
        token = expected.argmax(-1).astype(np.int32)
        ids = np.concatenate([ids, token[:, None]], axis=1)
        state, logits = generator.step(params, state, token)
