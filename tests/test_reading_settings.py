"""Reading-side settings: prefix K/V with context (`prefix_context=window`), memory keys at their
true RoPE positions (`memory_positions=true`) and per-layer memory (`memory_kv=per_layer`). All
three together, with every prefix chunk retrieved in every layer, are full attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memlong_jax.eval import generation
from memlong_jax.memlong import scan
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.presets import PRESETS

from helpers import random_token_ids, reference_score, sharp_params

CFG = PRESETS["tiny"].model
MODULE = LlamaForCausalLM(CFG)
# Every layer reads memory, top-k covers the whole memory (8 chunks of 4 tokens).
EVERYTHING = PRESETS["tiny"].memlong.replace(memory_layer=0, retrieval_layers=(0, 1, 2, 3),
                                             top_k=8, memory_tokens=32)
READ_ALL = dict(prefix_context="window", memory_positions="true", memory_kv="per_layer")


@pytest.fixture(scope="module")
def params():
    return sharp_params(MODULE)


def random_ids(seed, batch=2, length=40):
    return random_token_ids(seed, CFG.vocab_size, batch, length)


@functools.partial(jax.jit, static_argnames=("mcfg", "window"))
def window_nll(params, ids, mcfg, window):
    state = scan.init_state(MODULE, mcfg, ids.shape[0])
    return scan.score_sequence(MODULE, mcfg, params, state, ids, window)


def full_nll(params, ids, window):
    logits = MODULE.apply({"params": params}, ids)
    return np.asarray(scan.token_nll(logits[:, :-1], ids[:, 1:]))[:, -(window - 1):]


@pytest.mark.parametrize("length,window", [(24, 12), (32, 16), (36, 12)],
                         ids=["one-prefix-segment", "prefix=window", "two-prefix-segments"])
@pytest.mark.parametrize("query_mode", ["causal", "chunk"])
def test_per_layer_true_positions_with_context_is_full_attention(params, length, window,
                                                                  query_mode):
    """Each retrieval layer reads its own K/V of every earlier token, at its true position, and
    those K/V were computed with all earlier tokens in view: the joint softmax over [memory ;
    local] is the full causal softmax, so the window's NLL is full attention's (fp32 sums in
    another order: 1e-5)."""
    ids = random_ids(length + window)
    mcfg = EVERYTHING.replace(query_mode=query_mode, **READ_ALL)
    nll = np.asarray(window_nll(params, ids[:, :length], mcfg, window)[1])
    np.testing.assert_allclose(nll, full_nll(params, ids[:, :length], window), atol=1e-5, rtol=0)


@pytest.mark.parametrize("missing", ["memory_kv", "memory_positions"])
def test_each_setting_is_needed_for_full_attention(params, missing):
    """Upstream's value for either reading setting breaks the equality. (`prefix_context` is
    not needed for it: with per-layer memory the prefix chunks already read every earlier chunk
    at true positions, which is exact full attention chunk by chunk.)"""
    ids = random_ids(5, length=32)
    mcfg = EVERYTHING.replace(**READ_ALL).replace(**{missing: {
        "prefix_context": "chunk", "memory_positions": "zero", "memory_kv": "shared"}[missing]})
    nll = np.asarray(window_nll(params, ids, mcfg, 16)[1])
    assert np.abs(nll - full_nll(params, ids, 16)).max() > 1e-2


def test_prefix_with_context_stores_the_window_forward_kv(params):
    """`prefix_context=window`: the memory holds, for each window-sized prefix segment, the
    memory layer's pre-RoPE K/V of that segment run as a whole (the first segment has no memory
    to read, so a plain forward of its tokens); `chunk` holds each chunk computed alone."""
    mcfg = PRESETS["tiny"].memlong.replace(memory_tokens=64)     # memory layer 1
    ids = random_ids(6, length=24)
    kv = lambda segment: np.asarray(scan.lower_stack(MODULE, mcfg, params, segment)[3])
    for context, pieces in (("window", [ids[:, :8]]), ("chunk", [ids[:, :4], ids[:, 4:8]])):
        state, _ = window_nll(params, ids, mcfg.replace(prefix_context=context), 8)
        keys = np.asarray(state.memory.keys)[:, :2].reshape(2, 8, *kv(ids[:, :4]).shape[2:])
        np.testing.assert_allclose(keys, np.concatenate([kv(p) for p in pieces], 1), atol=1e-5)
    assert np.abs(kv(ids[:, :8])[:, 4:] - kv(ids[:, 4:8])).max() > 1e-2   # context matters


def test_true_positions_follow_the_write_order(params):
    """After 11 chunks through 8 slots (eviction), each retrieved token's position is its place
    in the stream minus the segment's start, computed by hand from the write order."""
    mcfg = PRESETS["tiny"].memlong.replace(top_k=8, eviction="fifo_half")
    state = scan.ingest_prefix(MODULE, mcfg, params, scan.init_state(MODULE, mcfg, 2),
                                  random_ids(7, length=44))
    memory = state.memory
    indices, found = scan.select_chunks(mcfg, memory, state.last_emb)
    got = np.asarray(scan.retrieved_kv(memory, indices, found, "true").positions)
    stream_start = 44                      # the segment after the prefix starts at token 45
    for b in range(2):
        for i, slot in enumerate(np.asarray(indices[b])):
            first = int(memory.insert_time[b, slot]) * 4 + 1   # stream position of its 1st token
            np.testing.assert_array_equal(got[b, 4 * i:4 * i + 4],
                                          np.arange(first, first + 4) - stream_start)
    assert (got[np.asarray(jnp.repeat(found, 4, axis=1))] <= 0).all()   # the window starts at 1


@pytest.mark.parametrize("settings", [READ_ALL, dict(memory_positions="true"),
                                      dict(memory_kv="per_layer", query_mode="chunk")],
                         ids=["all", "positions", "per_layer+chunk"])
def test_generation_equals_scoring(params, settings):
    """Prompt of 37 (20 to memory, 17 in a 20-token cache), 3 fed tokens: the last prediction
    equals score_sequence's on the same 40 tokens, hits included."""
    mcfg = PRESETS["tiny"].memlong.replace(memory_tokens=64, **settings)
    ids = np.asarray(random_ids(8, length=40), np.int32)
    gen_obj = generation.Generator(MODULE, mcfg, 20)
    state, logits = gen_obj.start(params, ids[:, :37])
    for t in ids[:, 37:].T:
        state, logits = gen_obj.step(params, state, t)
    score_state = scan.init_state(MODULE, mcfg, 2)
    score_state, _, window_logits = reference_score(
        MODULE, mcfg, params, score_state, jnp.asarray(ids), 20)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(window_logits)[:, -1], atol=1e-4,
                               rtol=0)
    np.testing.assert_array_equal(np.asarray(state.memlong.memory.hits),
                                  np.asarray(score_state.memory.hits))


def test_near_positions_pack_the_picks_in_write_order(params):
    """`near`: the found picks sorted by write time sit back to back before the segment, the
    newest ending at 0; with every chunk since the start retrieved it is `true`."""
    mcfg = PRESETS["tiny"].memlong.replace(top_k=3)
    state = scan.ingest_prefix(MODULE, mcfg, params, scan.init_state(MODULE, mcfg, 2),
                               random_ids(8, length=28))
    memory = state.memory
    indices, found = scan.select_chunks(mcfg, memory, state.last_emb)
    got = np.asarray(scan.retrieved_kv(memory, indices, found, "near").positions)
    for b in range(2):
        times = np.asarray(memory.insert_time[b])[np.asarray(indices[b])]
        order = np.argsort(np.argsort(times))          # rank of each pick by write time
        for i in range(3):
            start = (order[i] - 3) * 4
            np.testing.assert_array_equal(got[b, 4 * i:4 * i + 4], np.arange(start + 1,
                                                                            start + 5))
    everything = mcfg.replace(top_k=7)                  # all 7 prefix chunks
    indices, found = scan.select_chunks(everything, memory, state.last_emb)
    assert np.asarray(found).all()
    np.testing.assert_array_equal(
        np.asarray(scan.retrieved_kv(memory, indices, found, "near").positions),
        np.asarray(scan.retrieved_kv(memory, indices, found, "true").positions))
