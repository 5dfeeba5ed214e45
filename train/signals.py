"""Whether training teaches the model to read its memory (issue 15, item 1).

Every `signal_every` steps, before the update, the step's batch is scored twice with the current
weights and no dropout: once as training sees it (the memory carried in from earlier steps and
written micro-step by micro-step) and once with the memory removed (every micro-step reads an
empty memory: the local block alone, with the same `prefix_overlap` context in front as
training gives it). Their difference is the memory gain in nats per token; a
run whose gain stays at zero is not learning to read, whatever its loss does. The attention mass
that each retrieval layer puts on the retrieved chunks (`memlong.diagnostics.memory_mass`) is
logged beside it. Nothing here changes the training state: the carried memory is only read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memlong_jax.memlong import diagnostics, scan
from memlong_jax.memlong.config import MemLongConfig
from train import lora, step


def block_nll(logits, ids):
    """Mean next-token NLL of a `[B, S]` block from its logits `[B, S, V]`."""
    return scan.token_nll(logits[:, :-1], ids[:, 1:]).mean()


def make_signal_step(module, mcfg: MemLongConfig, t, with_mass: bool = True):
    """`signals(trainable, frozen, mem, batch) -> dict of scalars`: `signal_loss` (with
    memory), `signal_loss_no_memory`, `memory_gain` (their difference, nats/token; positive when
    memory helps) and `memory_mass_l{layer}` per retrieval layer (mean over rows, heads, queries
    and micro-steps). `with_mass=False` leaves the mass out and saves its pass over the model
    (a third of the work) where only the gain is wanted."""
    scale = t.lora_alpha / t.lora_rank
    layers = sorted(mcfg.retrieval_layers)

    def signals(trainable, frozen, mem, batch):
        params = lora.merge(frozen, trainable, scale)
        empty = scan.reset_rows(mem, jnp.ones(mem.has_last.shape, bool))

        def micro(mem, xs):
            ids, key_emb, query, context, has_context = xs

            def run(context):
                new_mem, logits = scan.forward_step(module, mcfg, params, mem, ids, key_emb,
                                                    query, context)
                _, bare = scan.read_step(module, mcfg, params, empty, ids, key_emb, query,
                                         context=context)
                out = {"with": block_nll(logits, ids), "without": block_nll(bare, ids)}
                if with_mass:
                    out["mass"] = diagnostics.segment_memory_mass(
                        module, mcfg, params, mem, ids, key_emb, query, context).mean(axis=(0, 2))
                return new_mem, out

            return step.overlapped(run, context, has_context)

        _, per_micro = jax.lax.scan(micro, mem, step.micro_xs(batch))
        with_mem, without = per_micro["with"].mean(), per_micro["without"].mean()
        out = {"signal_loss": with_mem, "signal_loss_no_memory": without,
               "memory_gain": without - with_mem}
        if with_mass:
            out.update({f"memory_mass_l{layer}": per_micro["mass"][:, i].mean()
                        for i, layer in enumerate(layers)})
        return out

    return signals
