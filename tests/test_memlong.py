"""MemLong's chunk scan: invariants against the base model, itself, and a plain Python loop."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_token_ids, real_text, reference_score, sharp_params
from memlong_jax.llama.config import ConfigError
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.memlong import scan
from memlong_jax.presets import PRESETS

CFG = PRESETS["tiny"].model
MCFG = PRESETS["tiny"].memlong.validate(CFG)
MODULE = LlamaForCausalLM(CFG)


@pytest.fixture(scope="module")
def params():
    return sharp_params(MODULE)


def random_ids(seed, batch=2, length=40):
    return random_token_ids(seed, CFG.vocab_size, batch, length)


@functools.partial(jax.jit, static_argnames=("mcfg", "window", "prefix_nll"))
def score(params, ids, mcfg=MCFG, window=8, prefix_nll=True, state=None):
    state = scan.init_state(MODULE, mcfg, ids.shape[0]) if state is None else state
    if prefix_nll:   # the oracle: every prefix chunk a full forward step
        return reference_score(MODULE, mcfg, params, state, ids, window, prefix_nll=True)[:2]
    return scan.score_sequence(MODULE, mcfg, params, state, ids, window)


def base_nll(params, ids):
    logits = MODULE.apply({"params": params}, ids)
    return np.asarray(scan.token_nll(logits[:, :-1], ids[:, 1:]))


def test_empty_memory_equals_base_model(params):
    """One window, empty memory: the base model's logits and NLL. Positions 1..T instead of
    0..T-1 and the masked memory slots only reorder fp32 sums, hence 1e-5, not bit equality."""
    ids = random_ids(1, length=24)
    state = scan.init_state(MODULE, MCFG, 2)
    _, nll, logits = reference_score(MODULE, MCFG, params, state, ids, 24)
    np.testing.assert_allclose(np.asarray(logits),
                               np.asarray(MODULE.apply({"params": params}, ids)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(nll), base_nll(params, ids), atol=1e-5)
    assert np.asarray(nll).mean() > 1.0


def test_first_chunk_sees_nothing_later_chunks_do(params):
    ids = random_ids(2)
    _, nll = score(params, ids)
    tau = MCFG.chunk_size
    first_chunk = base_nll(params, ids[:, :tau + 1])
    np.testing.assert_allclose(np.asarray(nll[:, :tau]), first_chunk, atol=1e-5)
    # A later chunk alone, without memory, differs from the same chunk with retrieved memory.
    later = base_nll(params, ids[:, 3 * tau:4 * tau + 1])
    assert np.abs(np.asarray(nll[:, 3 * tau:4 * tau]) - later).max() > 1e-3


def test_scan_equals_python_loop(params):
    ids = random_ids(3)
    state, nll = score(params, ids)
    tau, batch = MCFG.chunk_size, ids.shape[0]
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros((batch, 1), ids.dtype)], axis=1)
    step = jax.jit(functools.partial(scan.forward_step, MODULE, MCFG))
    loop_state, pieces = scan.init_state(MODULE, MCFG, batch), []
    bounds = list(range(0, ids.shape[1] - 8, tau)) + [ids.shape[1] - 8]
    for start, stop in zip(bounds, bounds[1:] + [ids.shape[1]]):
        loop_state, logits = step(params, loop_state, ids[:, start:stop])
        pieces.append(scan.token_nll(logits, targets[:, start:stop]))
    loop_nll = jnp.concatenate(pieces, axis=1)[:, :-1]
    np.testing.assert_allclose(np.asarray(nll), np.asarray(loop_nll), atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(loop_state)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-6)


def test_prefix_without_logits_builds_the_same_memory(params):
    ids = random_ids(4)
    full_state, full_nll = score(params, ids, prefix_nll=True)
    fast_state, window_nll = score(params, ids, prefix_nll=False)
    # The fast path batches the prefix chunks through the frozen stack: same math, different
    # matmul shapes, so fp32 summation order may differ in the last bit.
    np.testing.assert_allclose(np.asarray(window_nll), np.asarray(full_nll[:, -7:]), atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(full_state), jax.tree_util.tree_leaves(fast_state)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5)


@pytest.mark.parametrize("block_chunks", [1, 3, 4, 64])
@pytest.mark.parametrize("query_mode, text_keys", [("causal", False), ("segment", True)])
def test_batched_prefix_ingestion_equals_a_chunk_loop(params, block_chunks, query_mode, text_keys):
    """11 chunks into 8 slots (eviction runs), blocks that do and do not divide the count."""
    mcfg = MCFG.replace(query_mode=query_mode)
    tau, ids = mcfg.chunk_size, random_ids(9, length=44)
    key_emb = None
    if text_keys:   # stand-in for text-retriever embeddings: random unit vectors
        key_emb = jax.random.normal(jax.random.PRNGKey(1), (2, 11, 24))
        key_emb = key_emb / jnp.linalg.norm(key_emb, axis=-1, keepdims=True)
    state = scan.init_state(MODULE, mcfg, 2, None if key_emb is None else 24)
    fast = jax.jit(functools.partial(scan.ingest_prefix, MODULE, mcfg.replace(
        ingest_chunks=block_chunks)))(params, state, ids, key_emb)
    step = jax.jit(functools.partial(scan.ingest_step, MODULE, mcfg))
    for c in range(11):
        emb = None if key_emb is None else key_emb[:, c:c + 1]
        state = step(params, state, ids[:, c * tau:(c + 1) * tau], emb,
                     None if emb is None else emb[:, 0])
    assert int(state.memory.clock.max()) > mcfg.capacity_chunks   # eviction happened
    for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(state)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5)


def permute_slots(state, perm):
    memory = jax.tree_util.tree_map(lambda x: x[:, perm] if x.ndim >= 2 else x, state.memory)
    return state._replace(memory=memory)


def test_retrieved_chunk_order_does_not_matter(params):
    ids = random_ids(5)
    state, _ = score(params, ids[:, :32], window=4)          # fill memory with 8 chunks
    window = random_ids(6, length=8)
    perm = np.random.default_rng(0).permutation(MCFG.capacity_chunks)
    _, a = score(params, window, state=state, window=8)
    _, b = score(params, window, state=permute_slots(state, perm), window=8)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    _, no_memory = score(params, window, window=8)
    assert np.abs(np.asarray(a) - np.asarray(no_memory)).max() > 1e-3  # memory was used


def nll_after_change(params, mcfg, ids, t, seed):
    """NLL of `ids`, and of `ids` with every token after position t replaced."""
    changed = ids.at[:, t + 1:].set(random_ids(seed, ids.shape[0], ids.shape[1])[:, t + 1:])
    return (np.asarray(score(params, ids, mcfg=mcfg)[1]),
            np.asarray(score(params, changed, mcfg=mcfg)[1]))


@pytest.mark.parametrize("retriever", ["hidden"])
def test_causal_mode_has_no_leakage(params, retriever):
    mcfg = MCFG.replace(query_mode="causal", retriever=retriever)
    ids = random_ids(7)
    for t in (2, 9, 17, 30, 33, 36):
        before, after = nll_after_change(params, mcfg, ids, t, seed=100 + t)
        np.testing.assert_array_equal(before[:, :t], after[:, :t])  # nll[:, i] predicts i+1
        assert not np.array_equal(before[:, t:], after[:, t:])


def test_segment_mode_leaks_through_the_choice_of_chunks(params):
    """Upstream's query is the whole segment: changing later tokens of the final window changes
    which chunks are retrieved, and so the NLL of earlier tokens in that window."""
    mcfg = MCFG.replace(query_mode="segment")
    ids = random_ids(8)
    leaks = 0
    for seed in range(6):
        before, after = nll_after_change(params, mcfg, ids, 35, seed=200 + seed)
        leaks += not np.array_equal(before[:, 32:35], after[:, 32:35])
    assert leaks > 0


def test_faiss_and_device_backends_agree_inside_scan(params):
    ids = random_ids(9)
    dev_state, dev = score(params, ids, mcfg=MCFG.replace(backend="device"))
    fai_state, fai = score(params, ids, mcfg=MCFG.replace(backend="faiss"))
    np.testing.assert_array_equal(np.asarray(dev), np.asarray(fai))
    np.testing.assert_array_equal(np.asarray(dev_state.memory.hits),
                                  np.asarray(fai_state.memory.hits))


def test_gradients_stop_at_the_memory(params):
    ids = random_ids(10)
    state, _ = score(params, ids[:, :32], window=4)

    def loss(p, kv):
        s = state._replace(memory=state.memory.replace(keys=kv[0], values=kv[1]))
        return scan.score_sequence(MODULE, MCFG, p, s, ids[:, 32:], 8)[1].mean()

    grads, mem_grads = jax.grad(loss, argnums=(0, 1))(
        params, (state.memory.keys, state.memory.values))
    norm = lambda tree: sum(float(jnp.abs(x).sum()) for x in jax.tree_util.tree_leaves(tree))
    m = MCFG.memory_layer
    assert norm(grads["model"]["embed_tokens"]) == 0.0
    for i in range(m):
        assert norm(grads["model"][f"layers_{i}"]) == 0.0, f"layer {i} below the memory layer"
    assert norm(mem_grads) == 0.0
    for i in range(m + 1, CFG.num_hidden_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert norm(grads["model"][f"layers_{i}"]["self_attn"][proj]) > 0.0
    assert norm(grads["lm_head"]) > 0.0


def test_memory_k_is_the_memory_layer_pre_rope_projection(params):
    ids = random_ids(11, batch=1, length=8)
    state, _ = score(params, ids, window=8)
    h = MODULE.apply({"params": params}, ids, method=MODULE.embed)
    h = MODULE.apply({"params": params}, h, None, 0, MCFG.memory_layer, method=MODULE.run_layers)
    _, k, v = MODULE.apply({"params": params}, h, MCFG.memory_layer, method=MODULE.memory_kv)
    # atol 1e-5: the scorer's jitted program fuses differently from these separate calls, and
    # values near 1.5 came out 10 ulps (1.2e-6) apart on a fresh draw; a wrong layer is off by O(1)
    stored = np.asarray(state.memory.keys[0, :2]).reshape(8, *k.shape[2:])
    np.testing.assert_allclose(stored, np.asarray(k[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.memory.values[0, :2]).reshape(8, *v.shape[2:]),
                               np.asarray(v[0]), atol=1e-5)


@pytest.mark.parametrize("change,field", [
    (dict(memory_layer=4), "memory_layer"),
    (dict(retrieval_layers=(0, 2)), "retrieval_layers"),
    (dict(retrieval_layers=(1, 4)), "retrieval_layers"),
    (dict(memory_tokens=30), "memory_tokens"),
    (dict(memory_tokens=4), "memory_tokens"),
    (dict(eviction="lru"), "eviction"),
    (dict(query_mode="future"), "query_mode"),
    (dict(backend="annoy"), "backend"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_memlong_config_names_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        MCFG.replace(**change).validate(CFG)


def test_presets_match_the_reference():
    ol = PRESETS["openllama3b"].memlong.validate(PRESETS["openllama3b"].model)
    assert (ol.memory_layer, ol.retrieval_layers, ol.chunk_size, ol.top_k) == (13, (13, 17, 21, 25), 128, 8)
    assert (ol.memory_tokens, ol.mem_dtype, ol.capacity_chunks) == (32768, "bfloat16", 256)
    sm = PRESETS["smollm2-135m"].memlong.validate(PRESETS["smollm2-135m"].model)
    assert (sm.memory_layer, sm.retrieval_layers) == (15, (15, 19, 23, 27))
    assert dataclasses.replace(sm, memory_layer=13, retrieval_layers=(13, 17, 21, 25)) == ol


@pytest.fixture(scope="module")
def minilm():
    from memlong_jax.memlong.retrievers import load_text_encoder
    return load_text_encoder()


def test_text_retriever_embeds_decoded_chunks(smollm2_converted, minilm):
    """Text retriever on a small LLaMA with SmolLM2's vocabulary: each stored chunk embedding
    is the encoder's embedding of that chunk's decoded text; the scan runs under jit."""
    from memlong_jax.io.tokenizer import load_tokenizer
    from memlong_jax.memlong.retrievers import TextRetriever

    tokenizer = load_tokenizer(smollm2_converted)
    cfg = CFG.replace(vocab_size=tokenizer.get_vocab_size())
    module = LlamaForCausalLM(cfg)
    p = module.init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))["params"]
    mcfg = MCFG.replace(retriever="text", memory_tokens=64)
    ids = np.asarray(tokenizer.encode(real_text(4000)).ids[:48], np.int32).reshape(2, 24)

    retriever = TextRetriever(tokenizer, mcfg.chunk_size, True, minilm)
    texts = np.asarray(retriever.chunk_texts(ids), object).reshape(2, 6)
    # each chunk's text straight from the vocabulary (byte-level BPE: the token strings are bytes
    # mapped to printable characters), independent of the tokenizer's decoder
    byte_of = {char: byte for byte, char in _bytes_to_unicode().items()}
    for row in range(2):
        assert len(texts[row]) == 6
        for c in range(6):
            pieces = "".join(tokenizer.id_to_token(int(i)) for i in ids[row, 4 * c:4 * c + 4])
            assert texts[row][c] == bytes(byte_of[ch] for ch in pieces).decode("utf-8")
    key_emb, query = retriever.chunk_keys(ids), retriever.window_query(ids[:, -8:])
    assert key_emb.shape == (2, 6, 384) and query.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(key_emb, axis=-1), 1.0, atol=1e-5)

    run = jax.jit(lambda p, s, ids, e: reference_score(module, mcfg, p, s, ids, 8, e,
                                                       prefix_nll=True)[:2])
    state, nll = run(p, scan.init_state(module, mcfg, 2, emb_dim=384), ids, key_emb)
    assert nll.shape == (2, 23) and np.isfinite(np.asarray(nll)).all()
    stored = np.asarray(state.memory.emb)[:, :6]
    np.testing.assert_allclose(stored, key_emb, atol=1e-6)
    np.testing.assert_allclose(minilm.encode_texts([texts[0][4]])[0], key_emb[0, 4], atol=1e-5)


def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table
