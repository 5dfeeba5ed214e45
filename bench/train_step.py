"""Training step time, tokens/s, TFLOP/s and MFU (frozen-aware FLOPs) for the train presets, with
compilation timed apart.

    .venv/bin/python -m bench.train_step              # full run -> bench/results/train_step.json
    .venv/bin/python -m bench.train_step --quick      # smoke test (tiny only) -> out/bench-quick/

Why: `python -m train.run` logs step time and MFU only on GPUs it knows; this measures the same
step on any machine against a matmul peak measured in the same run, so training efficiency is a
number with a machine attached.

What runs is the training program's own code, not a copy: `train.config.resolve` (preset plus
`--set` overrides), `train.setup.load_base` / `split_params` (LoRA split), `train.step.make_train_step`
(jitted with the memory and state donated, as `Trainer` does) and `train.metrics.step_flops`
(frozen layers 2 FLOPs per weight, trained ones 6, memory attention counted). Batches are random
token ids (and random unit retriever embeddings for the text retriever): the step's cost does
not depend on the data. The memory starts empty and fills as the steps run, as in training.

Per preset overrides applied by default (`--set` adds to them):
    tiny          the preset unchanged (seq_len 32, grad_accum 2)
    smollm2-135m  grad_accum=2 (the preset's 8 would make one CPU step minutes long; per-token
                  rates do not depend on it), seq_len 1024 as the preset
MFU = achieved FLOP/s / peak: on CPU the fp32 matmul peak measured here; on a known GPU also the
nominal bf16 peak (`train.metrics.PEAK_TFLOPS`).

Estimated wall time of the default run on a quiet 2-core CPU: 8-12 minutes (smollm2-135m's
compile and ~20-40 s steps).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from bench import common

NAME = "train_step"
BENCH_OVERRIDES = {"tiny": [], "smollm2-135m": ["grad_accum=2"]}


def build_parser():
    p = common.parser(__doc__, NAME)
    p.add_argument("--presets", help="comma separated (default: tiny,smollm2-135m; --quick: tiny)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per preset (default: 20 for tiny, 3 otherwise)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="train setting for every preset, as `python -m train.run --set`")
    return p


def build(name: str, overrides: list[str], load_base=None):
    """Everything `Trainer` builds for a step, minus data, checkpoints and sharding.
    `load_base(run, model)`: base params in the run's param_dtype, instead of
    `train.setup.load_base` (bench/gpu.py passes random weights built on the device)."""
    import jax
    import jax.numpy as jnp
    from memlong_jax.memlong import scan
    from train import config as cfgmod
    from train import setup
    from train import step as stepmod

    run = cfgmod.resolve(name, BENCH_OVERRIDES.get(name, []) + overrides)
    init_from = run.train.init_from
    if init_from and not os.path.isabs(init_from):
        run = cfgmod.Resolved(run.name, run.train.replace(
            init_from=os.path.join(common.REPO, init_from)), run.memlong)
    model = cfgmod.model_config(run)
    run = cfgmod.validate(run, model)
    t, m = run.train, run.memlong
    base = (load_base or setup.load_base)(run, model)
    frozen, trainable = setup.split_params(run, model, base)
    module = stepmod.make_module(model, t.dtype, t.remat, t.scan_layers)
    tx, schedule = stepmod.make_optimizer(t, max(1, t.steps))
    fresh = lambda tree: jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)
    state = fresh({"step": jnp.int32(0), "trainable": trainable, "opt_state": tx.init(trainable),
                   "rng": jax.random.PRNGKey(t.seed)})
    retriever = setup.make_run_retriever(run)
    emb_dim = retriever.embedding_size(model)
    mem = fresh(scan.init_state(module, m, t.rows_per_replica, emb_dim))
    rng = np.random.default_rng(0)
    shape = (t.grad_accum, t.rows_per_replica)
    batch = {"ids": jnp.asarray(rng.integers(0, model.vocab_size, shape + (t.seq_len,),
                                             np.int32))}
    if retriever.host_side:
        unit = lambda s: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(
            rng.standard_normal(s).astype(np.float32))
        batch["key_emb"] = jnp.asarray(unit(shape + (t.seq_len // m.chunk_size, emb_dim)))
        if m.query_mode == "segment":
            batch["query"] = jnp.asarray(unit(shape + (emb_dim,)))
    step = jax.jit(stepmod.make_train_step(module, m, t, tx, schedule), donate_argnums=(0, 2))
    return run, model, step, state, frozen, mem, batch


def time_steps(step, state, frozen, mem, batch, steps: int, go_on=None) -> dict:
    """Compile `step` (timed apart), run it once, then time up to `steps` steps, the carried
    state and memory donated as in training; `go_on(i)` may stop before step i > 0."""
    import jax
    start = time.perf_counter()
    compiled = step.lower(state, frozen, mem, batch).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    state, mem, out = compiled(state, frozen, mem, batch)
    jax.block_until_ready(out)
    first_s = time.perf_counter() - start
    times = []
    for i in range(steps):
        if i and go_on is not None and not go_on(i):
            break
        start = time.perf_counter()
        state, mem, out = compiled(state, frozen, mem, batch)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    return {"compiled": compiled, "compile_s": compile_s, "first_s": first_s, "times": times,
            "state": state, "out": out}


def measure(name: str, overrides: list[str], steps: int, peak: dict) -> dict:
    import jax
    from train import metrics
    from train.lora import count

    run, model, step, state, frozen, mem, batch = build(name, overrides)
    t = run.train
    timed = time_steps(step, state, frozen, mem, batch, steps)
    compile_s, first, times, state, out = (timed[k] for k in (
        "compile_s", "first_s", "times", "state", "out"))
    flops = metrics.step_flops(model, run.memlong, t)
    timing = common.summary(times)
    tflops = flops["flops_per_replica_step"] / timing["median_s"] / 1e12
    nominal = metrics.peak_tflops(jax.devices()[0].device_kind, t.peak_tflops)
    return {"preset": name, "overrides": BENCH_OVERRIDES.get(name, []) + overrides,
            "seq_len": t.seq_len, "grad_accum": t.grad_accum, "rows": t.rows_per_replica,
            "trainable": t.trainable, "dtype": t.dtype, "remat": t.remat,
            "memlong": run.memlong.to_dict(),
            "params_trainable": count(state["trainable"]), "params_frozen": count(frozen),
            "compile_s": compile_s, "first_step_s": first, **timing,
            "tokens_per_step": flops["tokens_per_replica"],
            "tokens_per_s": flops["tokens_per_replica"] / timing["median_s"],
            "flops_per_token": flops["flops_per_token"],
            "flops_per_step": flops["flops_per_replica_step"], "tflops": tflops,
            "mfu_measured_peak": tflops * 1e3 / peak["gflops"],
            "mfu_nominal_peak": tflops / nominal if nominal else None,
            "final_loss": float(out["loss"])}


def main() -> None:
    args = build_parser().parse_args()
    if args.quick:
        args.presets, args.steps = args.presets or "tiny", args.steps or 3
    args.presets = args.presets or "tiny,smollm2-135m"
    started = time.perf_counter()
    import jax
    on_gpu = jax.default_backend() == "gpu"
    peak = common.matmul_peak((512, 1024) if args.quick else
                              (2048, 4096, 8192) if on_gpu else (1024, 2048, 3072),
                              dtype="bfloat16" if on_gpu else "float32")
    rows = []
    for name in [p.strip() for p in args.presets.split(",") if p.strip()]:
        steps = args.steps or (20 if name == "tiny" else 3)
        try:
            row = measure(name, args.overrides, steps, peak)
        except Exception as err:  # e.g. no converted checkpoint: keep the other presets
            print(f"{name}: skipped: {err}", file=sys.stderr)
            rows.append({"preset": name, "error": str(err)})
            continue
        rows.append(row)
        print(f"{name}: compile {row['compile_s']:.1f} s, step {row['median_s']:.3f} s, "
              f"{row['tokens_per_s']:.0f} tok/s, {row['tflops'] * 1e3:.1f} GFLOP/s, "
              f"MFU {row['mfu_measured_peak']:.1%} of measured peak", file=sys.stderr)
    common.finish(NAME, args, {"presets": args.presets}, {"matmul_peak": peak, "rows": rows},
                  started)


if __name__ == "__main__":
    main()
