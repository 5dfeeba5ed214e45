"""Generation with memory: torch parity inside the window, the scoring path's numbers with memory,
spills, sampling, and the command line's errors."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (LLAMA_SHAPES, byte_tokenizer, random_torch_llama, real_text, reference_score,
                     save_torch_llama)
import memlong_jax as ml
from memlong_jax.cli.generate import main as generate_main
from memlong_jax.errors import run_cli
from memlong_jax.eval import generation
from memlong_jax.io import checkpoint
from memlong_jax.llama.attention import grouped_attention, with_memory
from memlong_jax.llama.layers import apply_rope
from memlong_jax.llama.model import LlamaForCausalLM, layer_memory
from memlong_jax.memlong import scan
from memlong_jax.presets import PRESETS

CFG = PRESETS["tiny"].model
MCFG = PRESETS["tiny"].memlong.replace(memory_tokens=64)  # 16 slots of 4 tokens, hidden retriever
MODULE = LlamaForCausalLM(CFG)
WINDOW = 16  # 4 chunks; a spill moves 8 tokens


# Reference computations, jitted (eager op-by-op dispatch would dominate the test time).
plain_logits = jax.jit(lambda params, ids: MODULE.apply({"params": params}, ids))


@functools.partial(jax.jit, static_argnames=("mcfg",))
def score(params, ids, mcfg):
    """score_sequence from an empty memory with a WINDOW-token final window: (state, logits)."""
    state = scan.init_state(MODULE, mcfg, ids.shape[0])
    state, _, logits = reference_score(MODULE, mcfg, params, state, ids, WINDOW)
    return state, logits


def random_params(seed):
    """Random weights, sharper than the init (0.08 std, norm scales around 1), built on the host:
    no init function to compile."""
    rng = np.random.default_rng(seed)
    draw = lambda leaf: (rng.normal(size=leaf.shape) * 0.08 if len(leaf.shape) == 2
                         else 1.0 + 0.2 * rng.normal(size=leaf.shape)).astype(np.float32)
    return jax.tree_util.tree_map(draw, checkpoint.abstract_params(CFG))


@pytest.fixture(scope="module")
def params():
    return random_params(0)


def random_ids(seed, batch=2, length=40, low=0, high=CFG.vocab_size):
    return np.random.default_rng(seed).integers(low, high, size=(batch, length)).astype(np.int32)


def feed(gen_obj, params, prompt, tokens):
    """Start from `prompt`, then feed `tokens` `[B, n]` one by one: logits `[B, n+1, V]` (the
    prediction after each fed token) and the final state."""
    state, logits = gen_obj.start(params, prompt)
    out = [np.asarray(logits)]
    for t in tokens.T:
        state, logits = gen_obj.step(params, state, t)
        out.append(np.asarray(logits))
    return np.stack(out, axis=1), state


# ---- no memory yet: the plain model ----------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from convert.from_hf import main as from_hf
    torch_model = random_torch_llama(seed=11, **LLAMA_SHAPES["gqa_tied"])
    root = tmp_path_factory.mktemp("generate")
    save_torch_llama(torch_model, root / "hf", "safetensors")
    from_hf([str(root / "hf"), str(root / "jax"), "--quiet", "--no-tokenizer"])
    return torch_model, ml.load(str(root / "jax"))


def test_greedy_matches_torch_generate(converted):
    import torch
    torch_model, model = converted
    prompt = random_ids(1, batch=2, length=9, low=3, high=211)  # no pad/eos ids in the prompt
    mcfg = model.memlong_config.replace(chunk_size=4, memory_tokens=64, retriever="hidden")
    got = model.generate(prompt, 14, window=24, mcfg=mcfg)      # 9 + 14 tokens fit in 24
    with torch.no_grad():
        expected = torch_model.generate(torch.as_tensor(prompt, dtype=torch.long),
                                        attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                                        do_sample=False, max_new_tokens=14).numpy()[:, 9:]
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(got)) > 3  # not a degenerate repetition


def test_decode_logits_equal_the_plain_forward(params):
    """Prompt of 5, then 11 fed tokens: the cache ends exactly full (16 = window)."""
    prompt, fed = random_ids(2, length=5), random_ids(3, length=11)
    logits, state = feed(generation.Generator(MODULE, MCFG, WINDOW), params, prompt, fed)
    assert int(state.length) == WINDOW and not np.asarray(state.memlong.memory.valid).any()
    plain = plain_logits(params, np.concatenate([prompt, fed], axis=1))
    assert np.abs(plain).max() > 1.0
    np.testing.assert_allclose(logits, np.asarray(plain[:, 4:]), atol=1e-4, rtol=0)


# ---- with memory: the scoring path --------------------------------------------------------

@pytest.mark.parametrize("query_mode,prompt_len,n_fed", [("causal", 42, 2), ("segment", 40, 0)])
def test_decode_with_memory_equals_score_sequence(params, query_mode, prompt_len, n_fed):
    """Until the first spill, the cache holds exactly the tokens of score_sequence's final window
    (16 tokens at local positions 1..16), computed with the chunks the same query retrieves from
    the same prefix memory (7 or 6 chunks, written tau tokens at a time). So the logits after the
    window's last token are the same computation. causal: prefill of 14 tokens + 2 decode steps;
    segment: its query is the window's own tokens, so compare right after the 16-token prefill."""
    mcfg = MCFG.replace(query_mode=query_mode)
    prompt, fed = random_ids(4, length=prompt_len), random_ids(5, length=n_fed)
    logits, state = feed(generation.Generator(MODULE, mcfg, WINDOW), params, prompt, fed)
    assert int(state.length) == WINDOW
    ids = jnp.asarray(np.concatenate([prompt, fed], axis=1))
    score_state, window_logits = score(params, ids, mcfg)
    np.testing.assert_allclose(logits[:, -1], np.asarray(window_logits[:, -1]), atol=1e-4, rtol=0)
    memory = state.memlong.memory
    prefix_chunks = (prompt_len + n_fed - WINDOW) // MCFG.chunk_size
    np.testing.assert_array_equal(np.asarray(memory.valid.sum(axis=1)), prefix_chunks)
    np.testing.assert_array_equal(np.asarray(memory.hits),  # same retrievals, hits and all
                                  np.asarray(score_state.memory.hits))
    no_memory = np.asarray(plain_logits(params, ids[:, -WINDOW:]))[:, -1]
    assert np.abs(logits[:, -1] - np.asarray(no_memory)).max() > 1e-2  # memory was used


def test_spill_writes_what_scoring_writes(params):
    """A full cache of 16 tokens spills its oldest 8: their chunks enter memory with the memory
    layer's K/V and pooled embeddings of the window forward, the same chunks score_sequence writes
    for its final window (lower layers never see memory, so the context is the same)."""
    prompt, fed = random_ids(6, length=42), random_ids(7, length=2)
    gen_obj = generation.Generator(MODULE, MCFG, WINDOW)
    _, state = feed(gen_obj, params, prompt, fed)
    state = gen_obj.spill(state)
    ids = np.concatenate([prompt, fed], axis=1)
    score_state, _ = score(params, ids, MCFG)
    got, want = jax.device_get((state.memlong.memory, score_state.memory))
    np.testing.assert_array_equal(got.valid, np.broadcast_to(np.arange(16) < 9, (2, 16)))  # 7+2
    for field in ("keys", "values", "emb"):
        np.testing.assert_allclose(getattr(got, field)[:, 7:9], getattr(want, field)[:, 7:9],
                                   atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(state.memlong.last_emb), want.emb[:, 8], atol=1e-5)
    assert int(state.length) == 8
    np.testing.assert_array_equal(np.asarray(state.ids)[:, :8], ids[:, -8:])  # kept, shifted


@functools.partial(jax.jit, static_argnames=("mcfg",))
def reference_decode(params, state, tokens, mcfg):
    """One decode step the plain way: each layer's keys, un-rotated in token order (the cache's
    `keys`, the new one appended), rotated all at once at positions 1..W, then dense
    `grouped_attention` with the retrieved memory prepended (`with_memory`) -> logits `[B, V]`."""
    apply = functools.partial(MODULE.apply, {"params": params})
    slot, cos, sin = state.length, *state.rope
    h = apply(tokens[:, None], method=MODULE.embed)
    for layer, cache in enumerate(state.cache):
        def attend(q, k, v, cache=cache, layer=layer):
            put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new, slot, axis=1)
            keys = apply_rope(put(cache.keys, k), cos, sin)
            values = put(cache.token_values(), v)
            at = lambda table: jax.lax.dynamic_slice_in_dim(table, slot, 1, axis=1)
            mask = (jnp.arange(WINDOW) <= slot)[None, None]
            memory = layer_memory(state.retrieved, layer, mcfg.retrieval_layers, CFG.head_dim,
                                  CFG.rope_theta)
            if memory is not None:
                keys, values, mask = with_memory(keys, values, mask, memory, 1, slot[None])
            return grouped_attention(apply_rope(q, at(cos), at(sin)), keys, values, mask), None
        h, _ = apply(h, layer, attend, method=MODULE.layer_with_attention)
    return apply(h, method=MODULE.final)[:, 0]


def test_decode_after_spills_equals_the_plain_attention(params):
    """The cache keeps each key rotated, laid out for decoding, and rotates the kept keys again
    after a spill: 20 steps after a 42-token prompt (three spills) give the logits of attention
    over the un-rotated keys rotated afresh at every step."""
    gen_obj = generation.Generator(MODULE, MCFG, WINDOW)
    state, _ = gen_obj.start(params, random_ids(9, length=42))
    spills = 0
    for tokens in random_ids(10, length=20).T:
        if int(state.length) == WINDOW:
            state, spills = gen_obj.spill(state), spills + 1
        want = np.asarray(reference_decode(params, state, jnp.asarray(tokens), MCFG))
        state, logits = generation.decode(MODULE, MCFG, params, state, jnp.asarray(tokens))
        np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=0)
    assert spills == 3 and np.abs(want).max() > 1.0


def test_long_generation_spills_evicts_and_is_deterministic(params):
    """42-token prompt, 40 sampled tokens: 5 spills write 10 chunks after the 7 of the prompt's
    head, overflowing the 16 slots (eviction). Two runs agree token for token."""
    prompt = random_ids(8, length=42)
    sampling = generation.Sampling(temperature=1.0, top_p=0.9)

    def run():
        gen_obj = generation.Generator(MODULE, MCFG, WINDOW)
        state, logits = gen_obj.start(params, prompt)
        tokens, spills = [], 0
        for i in range(40):
            tokens.append(np.asarray(generation.sample(logits, jax.random.PRNGKey(i), sampling)))
            before = int(state.length)
            state, logits = gen_obj.step(params, state, tokens[-1])
            spills += int(state.length) < before
        return np.stack(tokens, 1), np.asarray(logits), state.memlong.memory, spills

    tokens, logits, memory, spills = run()
    assert spills == 5 and (np.asarray(memory.clock) == 17).all()
    assert 0 < int(memory.valid.sum(axis=1).max()) <= 16
    again = run()
    np.testing.assert_array_equal(tokens, again[0])
    np.testing.assert_array_equal(logits, again[1])
    np.testing.assert_array_equal(np.asarray(memory.emb), np.asarray(again[2].emb))


def test_text_retriever_spills_the_text_of_the_spilled_tokens():
    """Text retriever: every chunk in memory is embedded from the text of exactly its tokens
    (upstream embeds text from the start of the sequence instead)."""
    from memlong_jax.memlong.retrievers import load_text_encoder, make_retriever
    tokenizer, encoder = byte_tokenizer(), load_text_encoder()
    mcfg = MCFG.replace(retriever="text")
    p = random_params(3)
    prompt = np.asarray(tokenizer.encode(real_text(200)).ids[40:60], np.int32)[None]
    gen_obj = generation.Generator(MODULE, mcfg, WINDOW, make_retriever(mcfg, tokenizer, encoder))
    state, _ = gen_obj.start(p, prompt)             # 4 tokens to memory, 16 in the cache
    state = gen_obj.spill(state)                    # the cache's oldest 8 follow
    texts = [tokenizer.decode(prompt[0, i:i + 4].tolist()) for i in (0, 4, 8)]
    np.testing.assert_allclose(np.asarray(state.memlong.memory.emb)[0, :3],
                               encoder.encode_texts(texts), atol=1e-5)
    assert int(state.memlong.memory.valid.sum()) == 3


# ---- fused decode: runs of steps in one jitted call ------------------------------------------

# (prompt length, MemLong settings): a prompt that fits the window (local until the first
# spill), one whose head goes to memory in each query mode (chunk: a refresh every 4 tokens).
FUSED_CASES = {"local": (5, MCFG), "causal": (42, MCFG),
               "chunk": (42, MCFG.replace(query_mode="chunk")),
               "segment": (40, MCFG.replace(query_mode="segment"))}


def stepwise_logits(gen_obj, params, prompt, n, sampling, seed):
    """The loop before fusing, written out: `sample` with fold_in(key, i), then `step` -> the
    tokens `[n, B]` and the logits each was chosen from `[n, B, V]`."""
    key = jax.random.PRNGKey(seed)
    state, logits = gen_obj.start(params, prompt)
    tokens, seen = [], []
    for i in range(n):
        seen.append(np.asarray(logits))
        tokens.append(np.asarray(generation.sample(logits, jax.random.fold_in(key, i), sampling)))
        if i + 1 < n:
            state, logits = gen_obj.step(params, state, tokens[-1])
    return np.stack(tokens), np.stack(seen)


@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("sampling", [generation.Sampling(),
                                      generation.Sampling(temperature=1.0, top_p=0.9)])
def test_decode_run_equals_the_stepwise_loop(params, case, sampling):
    """`decode_run` calls of up to 5 steps between spills and refreshes, 30 tokens after the
    prompt (the 16-slot cache spills 2-4 times): the same tokens as the step-by-step loop and
    the same logits at the end of every call, spills and refreshes included."""
    prompt_len, mcfg = FUSED_CASES[case]
    gen_obj = generation.Generator(MODULE, mcfg, WINDOW)
    prompt, n, seed = random_ids(11, length=prompt_len), 30, 5
    want_tokens, want_logits = stepwise_logits(gen_obj, params, prompt, n, sampling, seed)
    key, stops = jax.random.PRNGKey(seed), np.zeros(0, np.int32)
    state, _ = gen_obj.start(params, prompt)
    tokens, done, index, spills = jnp.asarray(want_tokens[0]), jnp.zeros(2, bool), 1, 0
    while index < n:
        before = int(state.length)
        state, free = gen_obj.room(state)
        spills += int(state.length) < before
        state, tokens, logits, done, out, taken = generation.decode_run(
            MODULE, mcfg, sampling, 8, params, state, tokens, key, index,
            min(free, 5, n - index), done, stops, 0)
        index += int(taken)
        np.testing.assert_array_equal(np.asarray(out)[:int(taken)],
                                      want_tokens[index - int(taken):index])
        np.testing.assert_allclose(np.asarray(logits), want_logits[index - 1], atol=1e-5,
                                   rtol=0)
    assert index == n and spills >= 2 and np.abs(want_logits).max() > 1.0


@pytest.mark.parametrize("case,retriever", [("local", "hidden"), ("chunk", "hidden"),
                                             ("chunk", "text")])
def test_fused_tokens_equal_the_stepwise_stream(params, case, retriever):
    """`Generator.tokens` fused (3 steps per call) yields what the step-by-step loop yields,
    sampled, across spills and refreshes (text retriever: embeddings made on the host between
    calls), and with stop tokens that end one row, then the other."""
    from memlong_jax.memlong.retrievers import load_text_encoder, make_retriever
    prompt_len, mcfg = FUSED_CASES[case]
    mcfg = mcfg.replace(retriever=retriever)
    tokenizer = byte_tokenizer()
    retriever = make_retriever(mcfg, tokenizer,
                               load_text_encoder() if retriever == "text" else None)
    text = np.asarray(tokenizer.encode(real_text(400)).ids, np.int32)
    prompt = np.stack([text[40:40 + prompt_len], text[200:200 + prompt_len]])
    sampling = generation.Sampling(temperature=1.0)
    stream = lambda run_steps, **kw: np.stack(list(
        generation.Generator(MODULE, mcfg, WINDOW, retriever, run_steps)
        .tokens(params, prompt, 30, sampling, seed=7, **kw)))
    want = stream(0)   # 0: TokenStream's loop, one step per call
    np.testing.assert_array_equal(stream(3), want)
    stops = [int(want[5, 0]), int(want[8, 1])]
    want_stopped = stream(0, stop_ids=stops, pad_id=1)
    assert len(want_stopped) <= 9 and np.isin(want_stopped, stops).any(axis=0).all()
    np.testing.assert_array_equal(stream(3, stop_ids=stops, pad_id=1), want_stopped)


# ---- sampling ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(params):
    return ml.Model(CFG, params)


def test_sampling_seed_top_k_and_stop(tiny_model):
    prompt = random_ids(9, length=5)
    generate = lambda **kw: tiny_model.generate(prompt, 12, window=WINDOW, mcfg=MCFG,
                                                stop_ids=(), **kw)
    greedy = generate()
    drawn = generate(temperature=1.0, seed=1)
    np.testing.assert_array_equal(drawn, generate(temperature=1.0, seed=1))
    assert not np.array_equal(drawn, generate(temperature=1.0, seed=2))
    assert not np.array_equal(drawn, greedy)
    np.testing.assert_array_equal(generate(temperature=1.0, top_k=1, seed=3), greedy)
    np.testing.assert_array_equal(generate(temperature=1.0, top_p=1e-6, seed=4), greedy)

    single = random_ids(10, batch=1, length=5)[0]  # a 1-D prompt
    full = tiny_model.generate(single, 12, window=WINDOW, mcfg=MCFG, stop_ids=())
    stop = int(full[4])
    first = int(np.flatnonzero(full == stop)[0])
    streamed = []
    stopped = tiny_model.generate(single, 12, window=WINDOW, mcfg=MCFG, stop_ids=[stop],
                                  on_token=streamed.append)
    np.testing.assert_array_equal(stopped, full[:first + 1])
    assert streamed == stopped.tolist()


def test_top_k_and_top_p_restrict_the_draws():
    logits = jnp.asarray(np.random.default_rng(10).normal(size=(1, 50)) * 2, jnp.float32)
    many = jnp.broadcast_to(logits, (4000, 50))
    order = np.argsort(-np.asarray(logits[0]))
    probs = np.exp(np.sort(np.asarray(logits[0]))[::-1])
    probs /= probs.sum()
    nucleus = set(order[:int(np.searchsorted(np.cumsum(probs), 0.6)) + 1])
    for sampling, allowed in [(generation.Sampling(1.0, top_k=3), set(order[:3])),
                              (generation.Sampling(1.0, top_p=0.6), nucleus)]:
        draws = set(np.asarray(generation.sample(many, jax.random.PRNGKey(0), sampling)).tolist())
        assert draws == allowed, (sampling, draws, allowed)
    assert 1 < len(nucleus) < 50


# ---- command line ------------------------------------------------------------------------

def test_cli_streams_what_generate_returns(tiny_checkpoint, capsys):
    prompt = real_text(300)[200:205]  # 5 byte tokens; 5 + 12 > 16: the cache spills once
    assert run_cli(generate_main, [tiny_checkpoint, "--prompt", prompt, "--window", "16",
                                   "--max-new-tokens", "12", "--set", "memory_tokens=64"]) == 0
    out = capsys.readouterr().out
    model = ml.load(tiny_checkpoint)
    tokens = model.generate(model.encode(prompt), 12, window=16, mcfg=MCFG)
    assert out == model.tokenizer.decode(tokens.tolist()) + "\n"
    assert len(tokens) > 3


@pytest.mark.parametrize("args", [
    ["--prompt", ""],
    ["--prompt", "hi", "--top-p", "0"],
    ["--prompt", "hi", "--top-p", "1.5"],
    ["--prompt", "hi", "--temperature", "-1"],
    ["--prompt", "hi", "--top-k", "-2"],
    ["--prompt", "hi", "--max-new-tokens", "0"],
    ["--prompt", "hi", "--max-new-tokens", "ten"],
    ["--prompt", "hi", "--window", "18"],          # not a multiple of chunk_size 4
    ["--prompt", "hi", "--window", "4"],           # one chunk: nothing left after a spill
    ["--prompt", "hi", "--set", "top_k=x"],
    ["--prompt", "hi", "--prompt-file", "f"],
    ["--prompt-file", "NOT_UTF8"],
    ["--prompt-file", "MISSING"],
])
def test_cli_bad_input_is_one_line(tiny_checkpoint, tmp_path, capsys, args):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("caf\u00e9 ".encode("latin-1") * 3)
    args = [str(bad) if a == "NOT_UTF8" else str(tmp_path / "missing.txt") if a == "MISSING"
            else a for a in args]
    assert run_cli(generate_main, [tiny_checkpoint, *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err


def test_cli_missing_checkpoint_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memlong_jax.generate", str(tmp_path / "none"),
                           "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "no such checkpoint" in proc.stderr
