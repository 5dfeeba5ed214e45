"""Time one MemLong chunk step (retrieve -> forward -> write) on this machine; JSON to stdout.

    python bench/chunk_step.py [--preset smollm2-135m] [--repeats 10] [--out FILE.json]

Measures, with a full memory (so top-k really gathers k chunks), a tau-token step that computes
NLL (`full`) and a prefix step that stops at the memory layer's K/V (`prefix`), plus the text
encoder's cost per chunk. Compilation is timed separately from the steady state.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from memlong_jax import memlong
from memlong_jax.config import PRESETS
from memlong_jax.memlong_config import MEMLONG_PRESETS
from memlong_jax.model import LlamaForCausalLM


def timed(fn, repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return {"first_call_s": compile_s, "median_s": statistics.median(times), "min_s": min(times)}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m", choices=sorted(MEMLONG_PRESETS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out")
    args = parser.parse_args()

    cfg, mcfg = PRESETS[args.preset], MEMLONG_PRESETS[args.preset].replace(retriever="hidden")
    module = LlamaForCausalLM(cfg)
    params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    tau = mcfg.chunk_size
    state = memlong.init_state(module, mcfg, 1)
    fill = jax.jit(lambda s, ids: memlong.score_sequence(module, mcfg, params, s, ids, tau)[0])
    ids = jax.random.randint(jax.random.PRNGKey(1), (1, 16 * tau), 0, cfg.vocab_size)
    state = fill(state, ids)  # 16 chunks stored: top-8 gathers 8 real chunks
    chunk = ids[:, :tau]
    step = jax.jit(functools.partial(memlong.segment_step, module, mcfg), static_argnames="full")
    results = {
        "full_step": timed(lambda: step(params, state, chunk, full=True)[1], args.repeats),
        "prefix_step": timed(lambda: step(params, state, chunk, full=False)[0].memory.keys,
                             args.repeats),
    }
    try:
        from memlong_jax.retrievers import default_encoder_dir, load_text_encoder
        encoder = load_text_encoder(default_encoder_dir())
        texts = [" ".join(["memory"] * 100)] * 16
        encode = timed(lambda: encoder.encode_texts(texts), max(1, args.repeats // 2))
        results["minilm_encode_per_chunk_s"] = encode["median_s"] / len(texts)
    except Exception as err:  # the encoder package is optional for this benchmark
        results["minilm_encode_per_chunk_s"] = f"skipped: {err}"
    report = {
        "preset": args.preset, "chunk_size": tau, "top_k": mcfg.top_k,
        "memory_tokens": mcfg.memory_tokens, "results": results,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "devices": [str(d) for d in jax.devices()]},
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
    }
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
