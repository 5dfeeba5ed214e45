"""Helpers shared by the tests: random torch LLaMAs saved in every HF format, real text, a byte
tokenizer. Imported as `from helpers import ...` (pytest puts tests/ on the path)."""

from __future__ import annotations

import json
import os
import random
import struct

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX.proto import event_pb2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from memlong_jax.io.documents import pydoc_text
from memlong_jax.llama.attention import MemoryKV
from memlong_jax.memlong import scan

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")

# Shapes that exercise MHA, GQA, tied/untied heads, head sizes that are not a multiple of 8 and
# a head_dim that is not hidden/heads, and several RoPE thetas.
LLAMA_SHAPES = {
    "mha_untied": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                       num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=False),
    "gqa_tied": dict(hidden_size=96, intermediate_size=128, num_attention_heads=6,
                     num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True),
    "odd_head_dim": dict(hidden_size=50, intermediate_size=72, num_attention_heads=5,
                         num_key_value_heads=5, rope_theta=10000.0, tie_word_embeddings=False),
    "explicit_head_dim_gqa": dict(hidden_size=64, intermediate_size=80, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=12, rope_theta=100000.0,
                                  tie_word_embeddings=False),
}


def random_torch_llama(seed: int, **shape):
    """A transformers LlamaForCausalLM with weights large enough that errors would show."""
    import torch   # heavy: only the tests that compare against torch load it
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=211, num_hidden_layers=3, max_position_embeddings=512,
                         rms_norm_eps=1e-5, initializer_range=0.08,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # ones by default: randomise so norms are tested
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    return model


def save_torch_llama(model, directory, fmt: str) -> None:
    """fmt: safetensors | sharded_safetensors | bin | sharded_bin.

    transformers 5 always writes safetensors, so `.bin` files (with a shard index when sharded)
    are written with `torch.save` here, laid out as older transformers versions wrote them.
    """
    import torch

    sharded = fmt.startswith("sharded")
    model.save_pretrained(directory, max_shard_size="20KB" if sharded else "10GB")
    if "bin" not in fmt:
        return
    for name in os.listdir(directory):
        if "safetensors" in name:
            os.remove(os.path.join(directory, name))
    state = {k: v for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    if not sharded:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
        return
    names = list(state)
    shards = [names[i:i + 5] for i in range(0, len(names), 5)]
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save({k: state[k] for k in shard}, os.path.join(directory, file))
        weight_map.update({k: file for k in shard})
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def real_text(n_chars: int = 40000) -> str:
    """English reference text that ships with every CPython."""
    return pydoc_text()[:n_chars]


def byte_tokenizer():
    """A byte-level BPE with exactly 256 tokens (no merges): matches the `tiny` preset's vocab,
    round-trips any UTF-8 text, and needs no download."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))},
                                     merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def toy_corpus(path, seed: int, repeats: int = 200) -> str:
    """A repetitive text: one random 'sentence' of random words, repeated."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6)))
             for _ in range(20)]
    line = " ".join(rng.choice(words) for _ in range(12)) + ".\n"
    path.write_text(line * repeats)
    return str(path)


def sharp_params(module, seed: int = 0):
    """Random params for `module` with 2-d weights scaled by 4: a sharper model, so that memory
    reading errors show in the NLL."""
    p = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    return jax.tree_util.tree_map(lambda x: x * 4.0 if x.ndim == 2 else x, p)


def random_token_ids(seed, vocab_size: int, batch=2, length=40):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, vocab_size)


def reference_score(module, mcfg, params, state, ids, window: int, key_emb=None,
                    window_query=None, prefix_nll: bool = False):
    """Test oracle for the scoring protocol on `ids` `[B, N]`: returns (state, nll, the final
    window's logits `[B, window, V]`). The prefix goes through `scan.ingest_prefix`, or with
    `prefix_nll` through a `lax.scan` of full `forward_step`s, one per tau-token chunk, which
    scores every token (nll `[B, N - 1]`: each prefix chunk predicts its successor's first token
    from its own last position); else nll `[B, window - 1]`."""
    tau, (batch, total) = mcfg.chunk_size, ids.shape
    prefix, n_prefix = total - window, (total - window) // tau
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros((batch, 1), ids.dtype)], axis=1)
    prefix_out = None
    if n_prefix and prefix_nll:
        def body(carry, xs):
            chunk_ids, chunk_targets, chunk_emb = xs
            carry, logits = scan.forward_step(module, mcfg, params, carry, chunk_ids,
                                              None if chunk_emb is None else chunk_emb[:, None],
                                              chunk_emb)
            return carry, scan.token_nll(logits, chunk_targets)

        by_chunk = lambda a: jnp.moveaxis(a.reshape(batch, n_prefix, tau, *a.shape[2:]), 1, 0)
        prefix_emb = None if key_emb is None else jnp.moveaxis(key_emb[:, :n_prefix], 1, 0)
        state, prefix_out = jax.lax.scan(
            body, state, (by_chunk(ids[:, :prefix]), by_chunk(targets[:, :prefix]), prefix_emb))
        prefix_out = jnp.moveaxis(prefix_out, 0, 1).reshape(batch, prefix)
    elif n_prefix:
        state = scan.ingest_prefix(module, mcfg, params, state, ids[:, :prefix],
                                   None if key_emb is None else key_emb[:, :n_prefix],
                                   window=window)
    state, logits = scan.forward_step(module, mcfg, params, state, ids[:, prefix:],
                                      None if key_emb is None else key_emb[:, n_prefix:],
                                      window_query)
    nll = scan.token_nll(logits, targets[:, prefix:])[:, :-1]
    if prefix_out is not None:
        nll = jnp.concatenate([prefix_out, nll], axis=1)
    return state, nll, logits


def explicit_segment(module, params, mcfg, state, ids, start: int, context=None, keys=None,
                     query=None):
    """Slow reference of one MemLong segment `ids` `[B, S]` (stream tokens start+1..start+S)
    with `context` `[B, c]` (whole chunks) before it. Retrieval: `scan.segment_inputs` on `ids`
    alone (host-side `keys` `[B, S/tau, d]` / segment `query`, or a causal query: none depends on
    this segment's K/V). Then the model layer by layer on [context; ids] at positions 1..c+S
    with the picks (chunk mode: the first chunk's picks read by the context chunks too; `true`
    positions: each memory token at its stream position minus the run's start); the K/V of `ids`
    at each stored layer's input are written, with `keys` or the memory layer's input of `ids`
    pooled. Returns (state, logits of `ids` `[B, S, V]`)."""
    lm, tau, batch = module.bind({"params": params}), mcfg.chunk_size, ids.shape[0]
    c = 0 if context is None else context.shape[1]
    run = ids if context is None else jnp.concatenate([context, ids], axis=1)
    seg = scan.segment_inputs(module, mcfg, params, state, ids, keys, query)
    picks, retrieved = np.asarray(seg.indices), seg.retrieved()
    if c and retrieved.per_chunk:
        front = lambda a: jnp.concatenate([a[:, :1]] * (c // tau) + [a], axis=1)
        retrieved = MemoryKV(*(None if a is None else front(a) for a in retrieved))
        picks = np.asarray(front(picks))
    if mcfg.memory_positions == "true":
        times = np.take_along_axis(np.asarray(state.memory.insert_time),
                                   picks.reshape(batch, -1), axis=1).reshape(picks.shape)
        stream = times[..., None] * tau + np.arange(1, tau + 1)
        retrieved = retrieved._replace(positions=jnp.asarray(
            (stream - (start - c)).reshape(*picks.shape[:-1], -1)))
    positions = jnp.broadcast_to(jnp.arange(1, run.shape[1] + 1), run.shape)
    h, stored = lm.model.embed_tokens(run), []
    for layer in range(module.config.num_hidden_layers):
        if layer == mcfg.memory_layer and keys is None:
            x = lm.model.layers[layer].memory_kv(h)[0][:, c:].astype(jnp.float32)
            pooled = x.reshape(batch, -1, tau, x.shape[-1]).mean(axis=2)
            keys = pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)
        if layer in mcfg.kv_layers:
            stored.append(lm.model.layers[layer].memory_kv(h)[1:])
        h = lm.model.run_layers(h, positions, layer, layer + 1, retrieved,
                                mcfg.retrieval_layers)
    k, v = (jnp.concatenate([s[j][:, c:] for s in stored], -1) for j in (0, 1))
    return scan.write_segment(mcfg, seg.memory, k, v, keys), lm.final(h)[:, c:]


def tensorboard_scalars(directory) -> list:
    """[(step, tag, value)] as TensorBoard shows a run's event files: read oldest first, and a
    SessionLog START at step s (a resumed run's purge_step) hides the older scalars at steps >= s."""
    def created(name):   # events.out.tfevents.<unix time>.<host>.<pid>
        return int(name.split(".")[3]), os.path.getmtime(os.path.join(directory, name))

    scalars = []
    for name in sorted(os.listdir(directory), key=created):
        data, pos = open(os.path.join(directory, name), "rb").read(), 0
        while pos < len(data):   # TFRecord framing: length, its CRC, payload, its CRC
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length
            if event.session_log.status == event_pb2.SessionLog.START:
                scalars = [s for s in scalars if s[0] < event.step]
            scalars += [(event.step, value.tag, value.simple_value) for value in event.summary.value]
    return scalars
