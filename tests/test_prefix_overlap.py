"""`prefix_overlap`: each prefix window segment after the first runs with the previous segment's
last chunk in front of it, unwritten, so its first stored token is not the segment's attention
sink (issue 15). Checked against a slow layer-by-layer forward of [previous chunk ; window]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memlong_jax.eval import scoring
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.memlong import scan
from memlong_jax.presets import PRESETS
from memlong_jax.settings import ConfigError

from helpers import explicit_segment, random_token_ids, sharp_params

CFG = PRESETS["tiny"].model
MODULE = LlamaForCausalLM(CFG)
TAU, WINDOW, PREFIX, EMB = 4, 8, 28, 8       # segments of 8, 8, 8 and 4 tokens
WINDOWED = PRESETS["tiny"].memlong.replace(memory_tokens=64, prefix_context="window")
SETTINGS = {"shared": dict(),
            "per_layer+near": dict(memory_kv="per_layer", memory_positions="near"),
            "per_layer+segment+true": dict(memory_kv="per_layer", query_mode="segment",
                                           memory_positions="true"),
            "per_layer+chunk": dict(memory_kv="per_layer", query_mode="chunk")}


@pytest.fixture(scope="module")
def params():
    return sharp_params(MODULE)


def host_embeddings(seed, batch=2):
    """Chunk keys and segment queries from a host-side retriever (random, unit norm), so that
    retrieval does not depend on the K/V being checked."""
    rng = np.random.default_rng(seed)
    unit = lambda a: jnp.asarray(a / np.linalg.norm(a, axis=-1, keepdims=True), jnp.float32)
    return (unit(rng.normal(size=(batch, PREFIX // TAU, EMB))),
            unit(rng.normal(size=(batch, -(-PREFIX // WINDOW), EMB))))


def ingest(params, mcfg, ids, keys, queries, context=None, state=None):
    state = scan.init_state(MODULE, mcfg, ids.shape[0], EMB) if state is None else state
    return scan.ingest_prefix(MODULE, mcfg, params, state, ids, keys, WINDOW,
                              queries if mcfg.query_mode == "segment" else None, context)


def reference(params, mcfg, ids, keys, queries):
    """Segment by segment: the slow explicit segment on [the chunk before it ; window]."""
    state = scan.init_state(MODULE, mcfg, ids.shape[0], EMB)
    for i, start in enumerate(range(0, PREFIX, WINDOW)):
        stop = min(start + WINDOW, PREFIX)
        state, _ = explicit_segment(MODULE, params, mcfg, state, ids[:, start:stop], start,
                                    ids[:, start - TAU:start] if start else None,
                                    keys[:, start // TAU:stop // TAU], queries[:, i])
    return state


def assert_same_state(got, want, atol=1e-5):
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=atol, rtol=0)


# upstream's reading and the recipe's run by default; the other query modes with `make test-all`
@pytest.mark.parametrize("settings", [
    pytest.param(v, id=k, marks=() if k in ("shared", "per_layer+near") else pytest.mark.slow)
    for k, v in SETTINGS.items()])
def test_each_written_chunk_is_computed_after_the_previous_chunk(params, settings):
    """The memory (K/V, keys, times, hits) equals the slow reference's (fp32, summation order:
    1e-5), and the context changed the K/V of every segment after the first."""
    mcfg = WINDOWED.replace(prefix_overlap=1, **settings).validate(CFG)
    ids = random_token_ids(11, CFG.vocab_size, 2, PREFIX)
    keys, queries = host_embeddings(11)
    got = ingest(params, mcfg, ids, keys, queries)
    assert_same_state(got, reference(params, mcfg, ids, keys, queries))
    plain = ingest(params, mcfg.replace(prefix_overlap=0), ids, keys, queries)
    changed = np.abs(np.asarray(got.memory.keys) - np.asarray(plain.memory.keys)).max((0, 2, 3, 4))
    assert (changed[:2] < 1e-5).all() and (changed[2:PREFIX // TAU] > 1e-2).all(), changed


def test_memory_holds_each_prefix_chunk_once_in_order(params):
    """7 prefix chunks -> 7 valid slots, written at times 0..6 with the chunks' own keys."""
    mcfg = WINDOWED.replace(prefix_overlap=1, memory_kv="per_layer")
    ids = random_token_ids(12, CFG.vocab_size, 2, PREFIX)
    keys, queries = host_embeddings(12)
    memory = ingest(params, mcfg, ids, keys, queries).memory
    n = PREFIX // TAU
    valid, times = np.asarray(memory.valid), np.asarray(memory.insert_time)
    assert (valid.sum(1) == n).all()
    for b in range(2):
        order = np.argsort(np.where(valid[b], times[b], np.iinfo(times.dtype).max))[:n]
        np.testing.assert_array_equal(times[b, order], np.arange(n))
        np.testing.assert_array_equal(np.asarray(memory.emb)[b, order], np.asarray(keys)[b])


def test_a_prefix_fed_in_blocks_continues_with_the_previous_block(params):
    """Two calls (`context`: the first call's tokens) store what one call stores; and the
    scorer, feeding blocks of 4 chunks (two windows), scores as the one-graph `score_sequence`."""
    mcfg = WINDOWED.replace(prefix_overlap=1, memory_kv="per_layer", query_mode="chunk")
    ids = random_token_ids(13, CFG.vocab_size, 2, PREFIX)
    keys, queries = host_embeddings(13)
    whole = ingest(params, mcfg, ids, keys, queries)
    half = ingest(params, mcfg, ids[:, :16], keys[:, :4], queries)
    assert_same_state(ingest(params, mcfg, ids[:, 16:], keys[:, 4:], queries, ids[:, :16],
                             half), whole)

    mcfg = mcfg.replace(retriever="hidden", host_block_chunks=4)
    protocol = scoring.Protocol((PREFIX + WINDOW,), WINDOW, WINDOW).validate(TAU)
    ids = np.asarray(random_token_ids(14, CFG.vocab_size, 1, PREFIX + WINDOW), np.int32)
    state, nll = scoring.Scorer(MODULE, params, mcfg, protocol).window_nll("memlong", ids)
    want_state, want = scan.score_sequence(MODULE, mcfg, params, scan.init_state(MODULE, mcfg, 1),
                                           jnp.asarray(ids), WINDOW)
    np.testing.assert_allclose(np.asarray(nll), np.asarray(want), atol=1e-5, rtol=0)
    assert_same_state(state, want_state)


CONTEXT_CASES = {**{name: (settings, False) for name, settings in SETTINGS.items()},
                 "per_layer+near, in-graph keys": (dict(memory_kv="per_layer",
                                                        memory_positions="near"), True)}


@pytest.mark.parametrize("settings, in_graph", CONTEXT_CASES.values(), ids=CONTEXT_CASES.keys())
def test_forward_step_with_context_equals_explicit_reference(params, settings, in_graph):
    """Training's step with `context` (the previous block's last chunk): the logits of `ids`
    and the memory written (in-graph: keys pooled from the run with context) equal the slow
    explicit segment's (fp32: 1e-5 on the state, 1e-4 on logits of about +-30), the memory
    equals what `ingest_step(context)` writes, and the context changes the logits."""
    mcfg = WINDOWED.replace(prefix_overlap=1, **settings).validate(CFG)
    ids = random_token_ids(21, CFG.vocab_size, 2, PREFIX)
    keys, queries = host_embeddings(21)
    start, stop = 2 * WINDOW, 3 * WINDOW                      # two windows already in memory
    keys = None if in_graph else keys
    seg_keys = None if in_graph else keys[:, start // TAU:stop // TAU]
    query = queries[:, 2] if mcfg.query_mode == "segment" else None
    state = ingest(params, mcfg, ids[:, :start], keys, queries,
                   state=scan.init_state(MODULE, mcfg, 2, None if in_graph else EMB))
    context, seg_ids = ids[:, start - TAU:start], ids[:, start:stop]
    got, logits = scan.forward_step(MODULE, mcfg, params, state, seg_ids, seg_keys, query,
                                    context)
    want, want_logits = explicit_segment(MODULE, params, mcfg, state, seg_ids, start, context,
                                         seg_keys, query)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=1e-4, rtol=0)
    assert_same_state(got, want)
    assert_same_state(got, scan.ingest_step(MODULE, mcfg, params, state, seg_ids, seg_keys,
                                            query, context))
    _, alone = scan.forward_step(MODULE, mcfg, params, state, seg_ids, seg_keys, query)
    assert np.abs(np.asarray(alone) - np.asarray(logits)).max() > 1e-2


def test_overlap_needs_window_segments():
    with pytest.raises(ConfigError, match="prefix_context=window"):
        PRESETS["tiny"].memlong.replace(prefix_overlap=1).validate(CFG)


@pytest.mark.parametrize("overlap,host_block_chunks", [(0, 3), (1, 3), (1, 5)])
def test_host_blocks_cut_the_prefix_where_its_windows_do(params, overlap, host_block_chunks):
    """`host_block_chunks` is speed only: blocks of 3 or 5 chunks (12, 20 tokens, not whole
    8-token windows) still ingest the 28-token prefix as windows of 8, 8, 8 and 4, so the
    scorer scores and stores what the one-graph `score_sequence` does."""
    mcfg = WINDOWED.replace(prefix_overlap=overlap, memory_kv="per_layer", retriever="hidden",
                            host_block_chunks=host_block_chunks)
    protocol = scoring.Protocol((PREFIX + WINDOW,), WINDOW, WINDOW).validate(TAU)
    ids = np.asarray(random_token_ids(15 + host_block_chunks, CFG.vocab_size, 1,
                                      PREFIX + WINDOW), np.int32)
    state, nll = scoring.Scorer(MODULE, params, mcfg, protocol).window_nll("memlong", ids)
    want_state, want = scan.score_sequence(MODULE, mcfg, params, scan.init_state(MODULE, mcfg, 1),
                                           jnp.asarray(ids), WINDOW)
    np.testing.assert_allclose(np.asarray(nll), np.asarray(want), atol=1e-5, rtol=0)
    assert_same_state(state, want_state)
