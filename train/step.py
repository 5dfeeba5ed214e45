"""The training step: LoRA/upper-layer loss through `scan.forward_step`, gradient accumulation
over micro-steps with the memory carried (and written) between them, AdamW with clipping and a
warmup / linear-decay schedule, and the validation scorer.

Each micro-step is one whole `seq_len` block per row, run as a single MemLong segment
(upstream's `last_context_length = seq_len`): retrieve from the memory
filled by earlier micro-steps, forward, loss, write the block's chunks. With
`prefix_overlap`, the last chunks of the stream's previous block run in front of it as
unwritten, unscored context (`batch["context"]`, `train.data.Streams.context`), so that memory
is written the way `ingest_prefix` writes it when reading; the run's very first micro-step has
none and runs alone (`overlapped`).
`value_and_grad` runs over the trainable subtree only; the frozen tree is a plain argument, and
`forward_step` already puts `stop_gradient` on the lower stack and on memory K/V. Gradients are
summed in a `lax.scan` carry (grad-inside-scan: exact, since nothing carried across micro-steps
has a gradient path) and averaged; every micro-batch has the same token count, so this is the
token mean of the whole step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from memlong_jax.llama.config import DTYPES, LlamaConfig
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.memlong import scan
from memlong_jax.memlong.config import MemLongConfig
from train import lora

def make_module(model: LlamaConfig, dtype: str, remat: str,
                scan_layers: bool = False) -> LlamaForCausalLM:
    return LlamaForCausalLM(model, dtype=DTYPES[dtype], remat_policy=remat,
                            scan_layers=scan_layers)


def make_schedule(lr: float, warmup: int, total: int, shape: str = "linear"):
    """0 -> lr over `warmup` steps (linear, or DeepSpeed's log curve), then linear to 0 at
    `total` (DeepSpeed WarmupDecayLR, as upstream)."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if warmup > 0:
            if shape == "log":
                warm = lr * jnp.log(step + 1.0) / jnp.log(float(max(warmup, 2)))
            else:
                warm = lr * step / warmup
        else:
            warm = jnp.float32(lr)
        decay = lr * jnp.clip((total - step) / max(1, total - warmup), 0.0, 1.0)
        return jnp.where(step < warmup, jnp.minimum(warm, lr), decay)

    return schedule


def make_optimizer(t, total_steps: int):
    schedule = make_schedule(t.lr, t.warmup_steps, total_steps, t.warmup_shape)
    parts = [optax.clip_by_global_norm(t.clip)] if t.clip > 0 else []
    parts.append(optax.adamw(schedule, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                             weight_decay=t.weight_decay))
    return optax.chain(*parts), schedule


def _retrieval_stats(mem: scan.MemLongState, mcfg: MemLongConfig):
    """Fraction of the top-k slots that will be filled by this micro-step's retrieval."""
    n_valid = mem.memory.valid.sum(axis=1)
    ok = jnp.ones_like(mem.has_last) if mcfg.query_mode == "segment" else mem.has_last
    found = jnp.where(ok, jnp.minimum(n_valid, mcfg.top_k), 0)
    return found.astype(jnp.float32).mean() / mcfg.top_k


def overlapped(run, context, has_context):
    """`run(context)` for a micro-step with `prefix_overlap` context (`[B, c]`, or None when
    off), `run(None)` when `has_context` (a traced bool) says it has none: the run's first."""
    if context is None:
        return run(None)
    return jax.lax.cond(has_context, run, lambda _: run(None), context)


def micro_xs(batch) -> tuple:
    """The per-micro-step inputs of a batch, in the order the micro-step scans take them:
    ids, key_emb, query, context, has_context (None where absent)."""
    return tuple(batch.get(k) for k in ("ids", "key_emb", "query", "context", "has_context"))


def make_train_step(module, mcfg: MemLongConfig, t, tx, schedule):
    """`step(state, frozen, mem, batch) -> (state, mem, metrics)`.

    state: {"step", "trainable", "opt_state", "rng"}; batch: {"ids": [A, B, S] int32, and for
    the text retriever "key_emb": [A, B, S/tau, d], "query": [A, B, d] (segment mode); with
    `prefix_overlap` "context": [A, B, c] int32 and "has_context": [A] bool}.
    """
    scale = t.lora_alpha / t.lora_rank
    dropout = t.lora_dropout if t.trainable == "lora" else 0.0

    def loss_fn(trainable, frozen, mem, ids, key_emb, query, context, has_context, rng):
        params = lora.merge(frozen, trainable, scale, dropout, rng)
        mem, logits = overlapped(lambda c: scan.forward_step(module, mcfg, params, mem, ids,
                                                             key_emb, query, c),
                                 context, has_context)
        nll = scan.token_nll(logits[:, :-1], ids[:, 1:])
        return nll.mean(), mem

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, frozen, mem, batch):
        rng, step_rng = jax.random.split(state["rng"])
        trainable = state["trainable"]

        def micro(carry, xs):
            gsum, mem = carry
            i, inputs = xs
            filled = _retrieval_stats(mem, mcfg)
            (loss, mem), grads = grad_fn(trainable, frozen, mem, *inputs,
                                         jax.random.fold_in(step_rng, i))
            return (jax.tree_util.tree_map(jnp.add, gsum, grads), mem), (loss, filled)

        accum = batch["ids"].shape[0]
        zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
        xs = (jnp.arange(accum), micro_xs(batch))
        (gsum, mem), (losses, filled) = jax.lax.scan(micro, (zeros, mem), xs)
        grads = jax.tree_util.tree_map(lambda g: g / accum, gsum)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        new_state = {"step": state["step"] + 1, "trainable": optax.apply_updates(trainable, updates),
                     "opt_state": opt_state, "rng": rng}
        memory = mem.memory
        valid_hits = jnp.where(memory.valid, memory.hits, 0)
        n_valid = jnp.maximum(memory.valid.sum(), 1)
        metrics = {
            "loss": losses.mean(),
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]),
            "mem_fill": memory.valid.mean(),
            "retrieved_frac": filled.mean(),
            "hits_per_chunk": valid_hits.sum() / n_valid,
            "chunks_hit_frac": (memory.valid & (memory.hits > 0)).sum() / n_valid,
        }
        return new_state, mem, metrics

    return step


def make_eval_step(module, mcfg: MemLongConfig, t, window: int, emb_dim: int | None):
    """`eval(trainable, frozen, ids, key_emb, query) -> (nll_sum, n_tokens)`: the scoring
    protocol (scan.score_sequence, fresh memory per window, last `window` tokens scored)."""
    scale = t.lora_alpha / t.lora_rank

    def evaluate(trainable, frozen, ids, key_emb, query):
        params = lora.merge(frozen, trainable, scale)
        state = scan.init_state(module, mcfg, ids.shape[0], emb_dim)
        _, nll = scan.score_sequence(module, mcfg, params, state, ids, window,
                                        key_emb=key_emb, window_query=query)
        return nll.sum(), jnp.float32(nll.size)

    return evaluate
