"""What bounds decoding on this machine: a decode step's pieces next to the time it takes to read
the model's weights once.

    .venv/bin/python -m bench.decode_profile            # -> bench/results/decode_profile.json
    .venv/bin/python -m bench.decode_profile --quick    # smoke test -> out/bench-quick/

Why (issue 19): the target is decode with a 2k prompt at 2x transformers' tokens/s. A batch-1
decode step reads every weight once (SmolLM2-135M in fp32: about 540 MB), so the memory bandwidth
bounds every engine; this says how close each one is to that bound, and where memlong-jax's time
per token goes (device step, host round trips, sampling).

Each engine in its own process (`common.run_worker`), SmolLM2-135M fp32, batch 1, a prompt of
`--length` tokens of real text (`bench.scoring.book_tokens`), greedy. Best of `--repeats`:

- weight streams: every 2-D weight read once by a matvec (a vector times each matrix): in XLA
  (one jitted function), numpy (BLAS) and torch (`torch.mv`); and XLA's sum over one array of the
  same size (the plain read rate). The weights' bytes over that time: the bandwidth each library
  reaches on the model's own matrices, and the time per token no decode step can beat.
- memlong (`eval.generation`, the checkpoint's MemLong settings and text retriever, window
  `--window`), per token, after `Generator.start` and the spill the full cache needs first: the
  jitted `decode` alone (synchronised every step, and dispatched back to back with one sync at
  the end); choosing a token on the host (`sample`, `fold_in`, the copy back); `decode_run`
  (the steps fused in one call); and the two loops end to end from the second call on (its
  spill excluded): the step-by-step `TokenStream.tokens` and the fused `Generator.tokens`.
- torch (transformers from the same GGUF, fp32, sdpa): one forward of a token against the
  prompt's KV cache, and `generate` per token as `bench.generation` measures it.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

from bench import common
from bench.scoring import book_tokens

NAME = "decode_profile"
ENGINES = ("memlong", "torch")


def build_parser():
    p = common.parser(__doc__, NAME)
    p.add_argument("--length", default="2k", help="prompt tokens (default: %(default)s)")
    p.add_argument("--window", default="2k", help="memlong's local KV cache (default: %(default)s)")
    p.add_argument("--steps", type=int, default=64,
                   help="tokens timed per repeat (default: %(default)s)")
    p.add_argument("--run-steps", type=int, default=32,
                   help="steps per fused decode_run call (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="default: %(default)s")
    p.add_argument("--checkpoint", default=common.SMOLLM2_CKPT)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    return p


def quick_args(args):
    args.length, args.window, args.steps, args.run_steps, args.repeats = "512", "256", 8, 4, 1
    return args


def best_ms(fn, repeats: int) -> float:
    """Best wall time of `fn()` (which waits for its own result), ms, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def stream_row(name: str, ms: float, nbytes: int) -> dict:
    return {"piece": name, "ms_per_token": ms, "gb_per_s": nbytes / ms / 1e6}


# ---- workers ----------------------------------------------------------------------------------

def memlong_worker(job: dict) -> dict:
    import jax
    import jax.numpy as jnp

    import memlong_jax as ml
    from memlong_jax.eval import generation
    from memlong_jax.presets import load_for_checkpoint

    repeats, steps = job["repeats"], job["steps"]
    model = ml.load(job["checkpoint"])
    weights = [w for w in jax.tree_util.tree_leaves(model.params) if w.ndim == 2]
    nbytes = sum(w.nbytes for w in weights)
    vector = jnp.ones(max(w.shape[0] for w in weights), jnp.float32)

    @jax.jit
    def matvecs(v, ws):
        """One matvec per matrix, each waiting for the one before (as the layers of a step)."""
        total = jnp.zeros((), jnp.float32)
        for w in ws:
            total = total + jnp.sum((v[:w.shape[0]] * (1 + 1e-30 * total)) @ w)
        return total

    flat, add_up = jnp.ones(nbytes // 4, jnp.float32), jax.jit(jnp.sum)
    host = [np.asarray(w) for w in weights]
    host_vector = np.asarray(vector)
    rows = [stream_row("weights: XLA matvecs", best_ms(
                lambda: matvecs(vector, weights).block_until_ready(), repeats), nbytes),
            stream_row("weights: numpy matvecs", best_ms(
                lambda: [host_vector[:w.shape[0]] @ w for w in host], repeats), nbytes),
            stream_row("weight-sized array: XLA sum", best_ms(
                lambda: add_up(flat).block_until_ready(), repeats), nbytes)]
    del flat, host

    mcfg = load_for_checkpoint(job["checkpoint"], model.config).validate(model.config)
    retriever = model.retriever(mcfg)
    retriever.encoder   # the text encoder loads now, not inside the timings
    generator = lambda run_steps: generation.Generator(model.module, mcfg, job["window"],
                                                       retriever, run_steps)
    gen_obj = generator(job["run_steps"])
    prompt = np.asarray(np.load(job["tokens"], mmap_mode="r")[:job["length"]])[None]
    params, key = model.params, jax.random.PRNGKey(0)
    gen, logits = gen_obj.start(params, prompt)
    base, free = gen_obj.room(gen)   # the full cache spills first
    if free < steps:
        sys.exit(f"--steps {steps} does not fit the {free} free cache slots")
    fresh = lambda: jax.tree_util.tree_map(jnp.copy, base)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    decode = lambda gen: generation.decode(model.module, mcfg, params, gen, token)

    def per_token(run):
        """Best over the repeats of run(fresh state) -> seconds for `steps` tokens, ms/token."""
        run(fresh())
        return 1e3 * min(run(fresh()) for _ in range(repeats)) / steps

    def decode_steps(sync_each: bool):
        def run(gen):
            start = time.perf_counter()
            for _ in range(steps):
                gen, out = decode(gen)
                if sync_each:
                    out.block_until_ready()
            out.block_until_ready()
            return time.perf_counter() - start
        return run

    def fused(gen):
        start = time.perf_counter()
        out = generation.decode_run(model.module, mcfg, generation.Sampling(), steps, params,
                                    gen, token, key, 1, steps, jnp.zeros(1, bool),
                                    np.zeros(0, np.int32), 0)
        jax.block_until_ready(out)
        return time.perf_counter() - start

    def choose(_):
        start = time.perf_counter()
        for i in range(steps):
            np.asarray(generation.sample(logits, jax.random.fold_in(key, i),
                                         generation.Sampling()))
        return time.perf_counter() - start

    def loop_ms(tokens, after: int) -> float:
        """ms per token of a whole generation loop, from the yield of token `after` on."""
        best = None
        for _ in range(repeats + 1):   # the first run compiles
            stamps = []
            for _ in tokens(params, prompt, steps + after + 1):
                stamps.append(time.perf_counter())
            ms = 1e3 * (stamps[-1] - stamps[after]) / (len(stamps) - 1 - after)
            best = ms if best is None else min(best, ms)
        return best

    rows += [stream_row(name, ms, nbytes) for name, ms in [
        ("memlong: decode step, synced each step", per_token(decode_steps(True))),
        ("memlong: decode steps back to back", per_token(decode_steps(False))),
        ("memlong: decode_run (steps fused)", per_token(fused)),
        ("memlong: choose a token on the host", per_token(choose)),
        ("memlong: step-by-step loop (Generator.tokens, run_steps 0)",
         loop_ms(generator(0).tokens, 1)),
        (f"memlong: fused loop (Generator.tokens, run_steps {job['run_steps']})",
         loop_ms(gen_obj.tokens, job["run_steps"]))]]
    return {"rows": rows, "weight_bytes": nbytes, "memlong": mcfg.to_dict(),
            "self_peak_rss_mb": common.peak_rss_mb(), "load_average": os.getloadavg()}


def torch_worker(job: dict) -> dict:
    import torch   # heavy: only this worker process loads it

    model, device, _ = common.torch_smollm2()
    repeats, steps = job["repeats"], job["steps"]
    weights = [w.detach() for w in model.parameters() if w.ndim == 2]
    weights = list({w.data_ptr(): w for w in weights}.values())   # tied embeddings once
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    vector = torch.ones(max(w.shape[1] for w in weights))
    ids = torch.as_tensor(np.asarray(np.load(job["tokens"], mmap_mode="r")[:job["length"]],
                                     np.int64)[None], device=device)

    def step_forward():
        with torch.inference_mode():
            out = model(ids, use_cache=True, logits_to_keep=1)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(steps):
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return time.perf_counter() - start

    def generate(n):
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           attention_mask=torch.ones_like(ids))
        return time.perf_counter() - start

    with torch.inference_mode():
        stream = best_ms(lambda: [torch.mv(w, vector[:w.shape[1]]) for w in weights], repeats)
    step_forward()
    step = 1e3 * min(step_forward() for _ in range(repeats)) / steps
    generate(2)
    per_token = 1e3 * min(generate(steps + 1) - generate(1) for _ in range(repeats)) / steps
    return {"rows": [stream_row("weights: torch.mv", stream, nbytes),
                     stream_row("torch: forward of one token with the KV cache", step, nbytes),
                     stream_row("torch: generate per token", per_token, nbytes)],
            "weight_bytes": nbytes, "torch_threads": torch.get_num_threads(),
            "self_peak_rss_mb": common.peak_rss_mb(), "load_average": os.getloadavg()}


# ---- driver -----------------------------------------------------------------------------------

def main() -> None:
    job = common.worker_job()
    if job is not None:
        common.worker_reply((torch_worker if job["engine"] == "torch" else memlong_worker)(job))
        return
    args = build_parser().parse_args()
    args = quick_args(args) if args.quick else args
    if args.steps < 2 or args.repeats < 1 or args.run_steps < 1:
        sys.exit("--steps must be at least 2, --repeats and --run-steps at least 1")
    started, git = time.perf_counter(), common.git_commit()
    checkpoint = common.require_checkpoint(args.checkpoint)
    length = common.parse_tokens(args.length)
    shared = {"tokens": book_tokens(checkpoint, length), "checkpoint": checkpoint,
              "length": length, "window": common.parse_tokens(args.window), "steps": args.steps,
              "run_steps": args.run_steps, "repeats": args.repeats}
    config = {"checkpoint": os.path.relpath(checkpoint, common.REPO),
              **{k: v for k, v in shared.items() if k not in ("tokens", "checkpoint")}}
    results = []
    for engine in ENGINES:
        row = {"engine": engine, **common.run_worker(os.path.abspath(__file__),
                                                     {**shared, "engine": engine}, args.timeout)}
        results.append(row)
        for r in row.get("rows", []):
            print(f"{r['piece']:>58}: {r['ms_per_token']:8.2f} ms/token "
                  f"({r['gb_per_s']:.1f} GB/s of weights)", file=sys.stderr)
        if "error" in row:
            print(f"{engine}: {row['error']}", file=sys.stderr)
        common.finish(NAME, args, config, results, started, git)   # after every engine


if __name__ == "__main__":
    main()
