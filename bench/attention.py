"""One attention call, dense masked path vs blockwise (online softmax) tiles, by length.

    .venv/bin/python -m bench.attention              # full run -> bench/results/attention.json
    .venv/bin/python -m bench.attention --quick      # smoke test (short, tiny) -> out/bench-quick/

Why: `llama.attention.BLOCKWISE` picks, per backend, the shortest causal sequence that goes
blockwise and the tile size; this script is the measurement behind that choice. Per length T it
times `grouped_attention` with the dense causal mask (what shorter sequences run) and
`blockwise_causal_attention` at several tile sizes, each plain causal and with `--memory` retrieved
keys in the same softmax (MemLong's final window), forward and forward + backward (training).
Random fp32 inputs of the model's attention shape (SmolLM2-135M: 9 query heads, 3 KV heads,
head_dim 64); batch 1; compile timed apart, best of `--repeats` calls (`common.time_jitted`).
The largest difference between the two paths' outputs is recorded as a sanity check.
Estimated wall time on a quiet 2-core CPU: 2-4 minutes.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from memlong_jax.llama.attention import (MemoryKV, blockwise_causal_attention, causal_mask,
                                   grouped_attention, with_memory)
from memlong_jax.presets import PRESETS

NAME = "attention"


def inputs(cfg, length: int, memory_slots: int, seed: int):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q, k, v = normal(1, length, heads, d), normal(1, length, kv, d), normal(1, length, kv, d)
    memory = (MemoryKV(normal(1, memory_slots, kv, d), normal(1, memory_slots, kv, d),
                       jnp.asarray(rng.random((1, memory_slots)) < 0.9))
              if memory_slots else None)
    return q, k, v, memory


def dense(q, k, v, memory):
    mask = causal_mask(q.shape[1], q.shape[1])
    if memory is not None:
        k, v, mask = with_memory(k, v, mask, memory)
    return grouped_attention(q, k, v, mask)


def with_grad(f):
    """Forward + backward of a scalar loss over the output, as a training step runs it."""
    return jax.grad(lambda q, k, v, m: jnp.sum(f(q, k, v, m) ** 2), argnums=(0, 1, 2))


def main():
    parser = common.parser(__doc__, NAME)
    parser.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    parser.add_argument("--lengths", default="512,1k,2k,4k")
    parser.add_argument("--blocks", default="128,256,512")
    parser.add_argument("--memory", default="1k", help="retrieved memory keys (default: 1k)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        args.preset, args.lengths, args.blocks, args.memory, args.repeats = \
            "tiny", "64,128", "32", "32", 2
    started = time.perf_counter()
    cfg = PRESETS[args.preset].model
    rows = []
    for n in common.parse_list(args.lengths):
        for slots in (0, common.parse_tokens(args.memory)):
            q, k, v, memory = inputs(cfg, n, slots, seed=n + slots)
            want = np.asarray(jax.jit(dense)(q, k, v, memory))
            paths = [("dense", None, dense)] + [
                ("blockwise", b, lambda q, k, v, m, b=b: blockwise_causal_attention(q, k, v, b, m))
                for b in common.parse_list(args.blocks) if b <= n]
            for path, block, f in paths:
                row = {"length": n, "memory_slots": slots, "path": path, "block": block}
                for kind, fn in (("forward", f), ("grad", with_grad(f))):
                    t = common.time_jitted(fn, q, k, v, memory, repeats=args.repeats)
                    row[kind] = {"min_s": t["min_s"], "median_s": t["median_s"],
                                 "compile_s": t["compile_s"]}
                row["max_abs_diff_vs_dense"] = float(np.abs(
                    np.asarray(jax.jit(f)(q, k, v, memory)) - want).max())
                rows.append(row)
                print(f"T={common.fmt_tokens(n):>5} memory={slots:>5} {path:>9} "
                      f"{block or '':>4}: forward {1e3 * row['forward']['min_s']:8.1f} ms, "
                      f"grad {1e3 * row['grad']['min_s']:8.1f} ms", flush=True)
    config = {"preset": args.preset, "heads": cfg.num_attention_heads,
              "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "dtype": "float32",
              "batch": 1, "timing": "best of repeats, compile apart"}
    common.finish(NAME, args, config, rows, started)


if __name__ == "__main__":
    main()
