"""Time one MemLong chunk step (retrieve -> forward -> write) on this machine.

    .venv/bin/python -m bench.chunk_step              # full run -> bench/results/chunk_step.json
    .venv/bin/python -m bench.chunk_step --quick      # smoke test (tiny preset) -> out/bench-quick/

Measures, with a full memory (so top-k really gathers k chunks), a tau-token step that computes
NLL (`full`) and a prefix step that stops at the memory layer's K/V (`prefix`), plus the text
encoder's cost per chunk. Compilation is timed separately from the steady state.
Random weights of the preset's shape (the cost does not depend on them). Estimated wall time on
a quiet 2-core CPU: 1-2 minutes.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.memlong import scan
from memlong_jax.presets import PRESETS

from bench import common


def main():
    parser = common.parser(__doc__, "chunk_step")
    parser.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.quick:
        args.preset, args.repeats = "tiny", 2
    started = time.perf_counter()

    cfg, mcfg = PRESETS[args.preset].model, PRESETS[args.preset].memlong.replace(retriever="hidden")
    module = LlamaForCausalLM(cfg)
    params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    tau = mcfg.chunk_size
    state = scan.init_state(module, mcfg, 1)
    fill = jax.jit(lambda s, ids: scan.score_sequence(module, mcfg, params, s, ids, tau)[0])
    ids = jax.random.randint(jax.random.PRNGKey(1), (1, 16 * tau), 0, cfg.vocab_size)
    state = fill(state, ids)  # 16 chunks stored: top-8 gathers 8 real chunks
    chunk = ids[:, :tau]
    results = {
        "full_step": common.time_jitted(lambda p, s, c: scan.forward_step(
            module, mcfg, p, s, c)[1], params, state, chunk, repeats=args.repeats),
        "prefix_step": common.time_jitted(lambda p, s, c: scan.ingest_step(
            module, mcfg, p, s, c), params, state, chunk, repeats=args.repeats),
    }
    try:
        from memlong_jax.memlong.retrievers import load_text_encoder
        encoder = load_text_encoder()
        texts = [" ".join(["memory"] * 100)] * 16
        encoder.encode_texts(texts)  # compiles
        times = []
        for _ in range(max(1, args.repeats // 2)):
            start = time.perf_counter()
            encoder.encode_texts(texts)
            times.append(time.perf_counter() - start)
        results["minilm_encode_per_chunk_s"] = statistics.median(times) / len(texts)
    except Exception as err:  # the encoder package is optional for this benchmark
        results["minilm_encode_per_chunk_s"] = f"skipped: {err}"
    config = {"preset": args.preset, "chunk_size": tau, "top_k": mcfg.top_k,
              "memory_tokens": mcfg.memory_tokens, "stored_chunks": 16}
    common.finish("chunk_step", args, config, results, started)


if __name__ == "__main__":
    main()
