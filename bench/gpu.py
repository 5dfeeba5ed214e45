"""GPU path: MemLong scoring of 80k-token windows and the `openllama3b` training step on a CUDA
machine, in bf16, with MFU and peak GPU memory, in one command under a wall-time budget.

    python bench/gpu.py                         # on the GPU machine -> bench/results/gpu.json
    python bench/gpu.py --budget-s 300          # more time: local/full modes, more repeats
    .venv/bin/python -m bench.gpu --quick       # CPU smoke test (tiny shapes) -> out/bench-quick/

Needs only jax (with CUDA), flax, optax and orbax, and the repository on PYTHONPATH: no model or
text-encoder weights, no faiss, no network. Every model is a seeded random init of the right
shape built on the device (`openllama3b`: 26 layers, hidden 3200, 32 heads of head_dim 100;
`smollm2-135m`), in bf16 (compute and storage); speed does not depend on the weights' values.
MemLong settings are each model's preset with `retriever=hidden` (in-graph mean-pooled
memory-layer states, no text encoder) and `backend=device` (exact top-k in-graph).

Measurements, in this order (each guarded: an error is recorded and the next one runs):

1. matmul peak: best bf16 square matmul (4096, 8192) on this device (fp32 on CPU); then the
   fused attention kernel's bf16 error against fp32 next to the dense path's
   (`results.fused_accuracy`, bench/fused_accuracy.py: cuDNN's numbers need a GPU).
2. scoring, openllama3b, memlong, 80k (81920) tokens: `memlong_jax.eval.scoring.Scorer.window_nll`,
   the path `python -m memlong_jax.score` runs (prefix through `memlong.ingest_prefix` in 8192-
   token host blocks, then the 2048-token local window scored with retrieval; a fresh memory
   per window, so the 32k-token memory fills and evicts). Random token ids. Then the same with
   `attention_kernel=fused` (row `...:fused`: `jax.nn.dot_product_attention`, cuDNN on a GPU,
   head_dim zero-padded to a multiple of 8, memory merged through its log-sum-exp; see
   memlong_jax/llama/fused.py), on the same weights and token ids.
3. training step, openllama3b: bench/train_step.py's `build` (train.config.resolve with `--set`
   style overrides, train.setup.split_params, train.step.make_train_step jitted with donation),
   overrides: init_from= (random), dtype/param_dtype bfloat16, memlong.retriever=hidden,
   memlong.backend=device, seq_len 1024, rows_per_replica 2, grad_accum 2 (`--train-set` adds
   or replaces; out of device memory, it is retried once with rows_per_replica 1). LoRA rank 64
   on q/k/v/o of layers 14-25, as the preset. FLOPs: train.metrics.step_flops (frozen-aware).
4. scoring, smollm2-135m shape, memlong at 8k, 32k and 80k tokens.
5. scoring, openllama3b, `local` (final 2048-token window alone), then `full` (plain causal over
   all 80k tokens) with the fused kernel, then `full` with the default one (blockwise attention)
   at 80k. Each `full` starts only when the budget left is at least 60 s and at least its
   estimate (30 s compile + its FLOPs at the rate `local` reached, a lower bound); its first run
   (compile excluded) may be its only timing (`timed_from_first_run`).

A row of the fused kernel records `mean_nll_max_diff_vs_auto`, how far its per-window mean NLL
lies from the default kernel's on the same windows (bf16 noise expected; a wrong kernel shows).

Timing: compilation is timed apart (AOT for the train step; `Scorer.last_compile_seconds` for
scoring), then one untimed run, then up to `--repeats` timed runs (at least one; no more once
the budget is spent); median reported. tokens/s = tokens per window (or step) / median s.

FLOPs (model FLOPs, 2 per multiply-add; what the computation needs, counted as the
implementation does it). Weights W_layer = q, k, v, o, gate, up, down of one layer
(train.metrics.layer_params); attention 4 * heads * head_dim per (query, key) pair (QK^T and PV).
- memlong, window N = P prefix + W local: each prefix token 2 * (m * W_layer + W_k + W_v)
  (layers below the memory layer m, plus its K/V) + m layers of causal attention inside its
  128-token chunk ((tau + 1) / 2 keys); each window token 2 * (L * W_layer + W_k + W_v) + the LM
  head on all W tokens (as scan.window_nll runs it) + causal attention ((W + 1) / 2 keys) in all L
  layers plus top_k * tau memory keys in the retrieval layers. Retrieval scores (2 * capacity *
  hidden per chunk query), norms, RoPE, softmax and memory writes are not counted (the first is
  reported apart as `retrieval_flops`).
- local: W tokens, all layers, causal attention; full: N tokens, all layers, causal attention
  (N (N + 1) / 2 pairs; the blockwise kernel also computes the masked half of diagonal blocks).
  Both run the LM head only on the scored predictions.
- training: train.metrics.step_flops (lower layers forward only, upper layers forward + both
  gradients, memory attention counted).
MFU = achieved FLOP/s / peak: the matmul peak measured above, and the nominal dense bf16 peak
(train.metrics.PEAK_TFLOPS: H100/H200 989 TFLOP/s) where the device is known.

Peak GPU memory is `None` where the backend keeps no allocator statistics (CPU).

Processes: every measurement group (the list above, groups split where models change) runs in
its own worker process (`common.run_worker`); the parent never touches the device. So each
worker has the whole device, and its own peak-memory mark, which matters because
`memory_stats()['peak_bytes_in_use']` is a process-wide high-water mark that cannot be reset.
Within a group each measurement records the mark before and after: `peak_gpu_bytes` is set when
the mark rose during that measurement (then it is that measurement's own peak, with every live
buffer counted, weights and memory included); otherwise only the upper bound is known. The first
measurement of a group always has its own peak. Each compiled program's own footprint (XLA
memory_analysis: arguments + outputs - aliased + temporaries) is recorded too.

Budget: `--budget-s` (default 150) is checked before each measurement and between timed
repeats; measurements that would start after it are recorded as skipped. A running
measurement is not interrupted (its compile can take a minute); a worker still running
`--timeout` seconds past the budget is killed and its group recorded as an error. Give the
command a hard timeout of about budget + 200 s. The JSON is rewritten after every group (and
names the group in progress), so a killed run keeps what it finished.

--quick (CPU smoke test, about 1-2 minutes): the `tiny` shape with head_dim 100 for scoring
(4096-token windows, so `full` goes blockwise), the `tiny` training preset (seq_len 256), the
`tiny` shape for the second scoring model; the fused rows run XLA's (unfused) implementation
there; numbers are meaningless.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # before jax is imported

import numpy as np  # noqa: E402

from bench import common  # noqa: E402

NAME = "gpu"
GiB = 2 ** 30
MODEL_TRAIN_OVERRIDES = ["init_from=", "dtype=bfloat16", "param_dtype=bfloat16",
                         "memlong.retriever=hidden", "memlong.backend=device"]


def build_parser():
    p = common.parser(__doc__, NAME)
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="no measurement starts after this many seconds (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per measurement (default: 3 windows, 5 train steps)")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="train setting for the training step (replaces the default of the same "
                        "key), e.g. rows_per_replica=1 or remat=full")
    p.add_argument("--only", default="",
                   help="comma-separated substrings: run only measurements whose name has one "
                        "(names: score:openllama3b:memlong:80k, train:openllama3b, ...)")
    p.add_argument("--seed", type=int, default=0, help="weights and token ids (default: 0)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a worker may run past the budget before it is killed "
                        "(default: %(default)s)")
    return p


# ---- the plan ---------------------------------------------------------------------------------

def plan(quick: bool) -> dict:
    """Models, lengths and the ordered measurement groups (models are freed between groups).
    A score item is ("score", model, mode, tokens, seconds it needs left, attention kernel)."""
    if quick:
        big, small, n_big = "tiny-hd100", "tiny", 4096
        window, scored, small_lengths = 256, 256, [512, 1024]
        train = ("tiny", ["seq_len=256", "rows_per_replica=1", "grad_accum=2"])
        full_min_left, min_left = 0, 0
    else:
        big, small, n_big = "openllama3b", "smollm2-135m", 81920
        window, scored, small_lengths = 2048, 2048, [8192, 32768, 81920]
        train = ("openllama3b", ["seq_len=1024", "rows_per_replica=2", "grad_accum=2"])
        full_min_left, min_left = 60, 15
    # The smollm2-135m step as docs/results.md's fine-tuning run takes it (16 streams of 1024).
    small_train = [] if quick else [[("train", small, ["seq_len=1024",
                                                      "rows_per_replica=16"])]]
    # The fused kernel next to the default one, same token ids: `full` fused before the
    # (slower) blockwise `full`, so that a short budget still measures the fused one.
    return {"window": window, "scored": scored, "groups": small_train + [
        [("score", big, "memlong", n_big, 0, "auto"),
         ("score", big, "memlong", n_big, min_left, "fused")],
        [("train", *train)],
        [("score", small, "memlong", n, min_left, "auto") for n in small_lengths],
        [("score", big, "local", n_big, min_left, "auto"),
         ("score", big, "full", n_big, full_min_left, "fused"),
         ("score", big, "full", n_big, full_min_left, "auto")],
    ]}


def model_config(name: str, kernel: str = "auto"):
    from memlong_jax.presets import PRESETS
    if name == "tiny-hd100":   # quick: head_dim 100 as openllama3b, on a 4-layer toy
        model, mcfg = PRESETS["tiny"].model.replace(head_dim=100), PRESETS["tiny"].memlong
    else:
        model, mcfg = PRESETS[name].model, PRESETS[name].memlong
    return model.replace(attention_kernel=kernel), mcfg


def measurement_name(item) -> str:
    if item[0] == "train":
        return f"train:{item[1]}"
    _, model, mode, n, _, kernel = item
    return f"score:{model}:{mode}:{common.fmt_tokens(n)}" + (
        "" if kernel == "auto" else f":{kernel}")


# ---- device helpers ---------------------------------------------------------------------------

_RANDOM_INIT = {}


def random_params(cfg, dtype, seed: int):
    """Seeded random weights of `cfg`'s shape, made on the device in `dtype`: N(0, 0.02) for
    matrices and embeddings, ones for RMSNorm weights (as the model's own init)."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util
    from memlong_jax.io.checkpoint import abstract_params

    # One small jitted initializer per distinct shape: a single jit over all of a 3B model's
    # tensors took minutes to compile on the H200.
    flat = traverse_util.flatten_dict(abstract_params(cfg, dtype))
    rng = jax.random.PRNGKey(seed)
    out = {}
    for i, (path, a) in enumerate(flat.items()):
        if path[-1] == "weight":
            out[path] = jnp.ones(a.shape, a.dtype)
            continue
        key = (a.shape, jnp.dtype(a.dtype).name)
        if key not in _RANDOM_INIT:
            _RANDOM_INIT[key] = jax.jit(
                lambda k, shape=a.shape, dt=a.dtype: 0.02 * jax.random.normal(k, shape, dt))
        out[path] = _RANDOM_INIT[key](jax.random.fold_in(rng, i))
    return jax.block_until_ready(traverse_util.unflatten_dict(out))


def gpu_memory() -> dict | None:
    import jax
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:   # backends without allocator statistics
        return None
    if not stats:
        return None
    return {k: stats.get(k) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}


def program_bytes(compiled) -> dict | None:
    """XLA's own footprint of one compiled program (None where unavailable)."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)
    return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
            "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes, "total": total}


def memory_fields(before: dict | None, after: dict | None) -> dict:
    if not after:
        return {"peak_gpu_bytes": None, "peak_gpu_gib": None, "gpu_memory": None}
    rose = before is None or after["peak_bytes_in_use"] > before["peak_bytes_in_use"]
    peak = after["peak_bytes_in_use"] if rose else None
    return {"peak_gpu_bytes": peak, "peak_gpu_gib": None if peak is None else peak / GiB,
            "peak_gpu_upper_bound_gib": after["peak_bytes_in_use"] / GiB,
            "gpu_memory": {"before": before, "after": after, "peak_is_this_measurement": rose}}


def efficiency(flops: float, seconds: float, peak: dict | None, nominal: float | None) -> dict:
    tflops = flops / seconds / 1e12
    return {"tflops": tflops,
            "mfu_measured_peak": tflops * 1e3 / peak["gflops"] if peak else None,
            "mfu_nominal_peak": tflops / nominal if nominal else None}


class Budget:
    def __init__(self, seconds: float, started: float):
        self.seconds, self.started = seconds, started

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()


# ---- FLOPs of scoring -------------------------------------------------------------------------

def score_flops(cfg, mcfg, mode: str, n: int, window: int, predictions: int) -> dict:
    from train.metrics import layer_params
    p = layer_params(cfg)
    w_layer, kv = sum(p.values()), p["k_proj"] + p["v_proj"]
    layers, m, tau = cfg.num_hidden_layers, mcfg.memory_layer, mcfg.chunk_size
    head = cfg.hidden_size * cfg.vocab_size
    pair = 4 * cfg.num_attention_heads * cfg.head_dim
    w = min(window, n)
    if mode == "memlong":
        prefix = n - w
        prefix_matmul = prefix * 2 * (m * w_layer + kv)
        prefix_attn = prefix * m * pair * (tau + 1) / 2
        window_matmul = w * 2 * (layers * w_layer + kv + head)
        mem_keys = mcfg.top_k * tau
        window_attn = w * pair * sum((w + 1) / 2 + (mem_keys if i in mcfg.retrieval_layers else 0)
                                     for i in range(layers))
        total = prefix_matmul + prefix_attn + window_matmul + window_attn
        retrieval = (prefix // tau + 1) * 2 * mcfg.capacity_chunks * cfg.hidden_size
        return {"total": total, "prefix_matmul": prefix_matmul, "prefix_attention": prefix_attn,
                "window_matmul": window_matmul, "window_attention": window_attn,
                "retrieval_flops": retrieval}
    seen = w if mode == "local" else n
    matmul = seen * 2 * layers * w_layer + predictions * 2 * head
    attn = layers * pair * seen * (seen + 1) / 2
    return {"total": matmul + attn, "matmul": matmul, "attention": attn}


# ---- measurements -----------------------------------------------------------------------------

class Runner:
    """Runs one group's measurements in a worker process: holds its models, the matmul peak
    and the budget."""

    def __init__(self, args, budget: Budget, layout: dict, peak: dict | None,
                 nominal: float | None):
        self.args, self.budget, self.layout = args, budget, layout
        self.peak, self.nominal = peak, nominal
        self.scorers: dict = {}   # (model, kernel) -> Scorer; the kernels share the weights
        self.params: dict = {}    # model -> weights

    def release(self) -> None:
        self.scorers.clear()
        self.params.clear()
        gc.collect()

    def scorer(self, name: str, kernel: str):
        import jax.numpy as jnp
        from memlong_jax.eval import scoring
        from memlong_jax.llama.model import LlamaForCausalLM
        if (name, kernel) not in self.scorers:
            cfg, mcfg = model_config(name, kernel)
            mcfg = mcfg.replace(retriever="hidden", backend="device").validate(cfg)
            if name not in self.params:
                self.params[name] = random_params(cfg, jnp.bfloat16, self.args.seed)
            module = LlamaForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
            protocol = scoring.Protocol((self.layout["window"],), self.layout["window"],
                                        self.layout["scored"]).validate(mcfg.chunk_size)
            # retriever=hidden: no text encoder or tokenizer (the default Scorer retriever)
            self.scorers[name, kernel] = scoring.Scorer(module, self.params[name], mcfg,
                                                        protocol)
        return self.scorers[name, kernel]

    def timed_runs(self, default: int) -> int:
        return self.args.repeats or default

    def train_with_fallback(self, preset: str, defaults: list[str]) -> dict:
        """`train`, retried with rows_per_replica=1 when the device runs out of memory."""
        try:
            return self.train(preset, defaults)
        except Exception as err:
            text = str(err)
            oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
            chosen = any(x.startswith("rows_per_replica") for x in self.args.train_set)
            if not oom or chosen or "rows_per_replica=1" in defaults or self.budget.left() <= 0:
                raise
            print(f"train {preset}: out of memory, retrying with rows_per_replica=1",
                  file=sys.stderr, flush=True)
            first = f"{type(err).__name__}: {text}"[:1000]
        self.release()
        row = self.train(preset, merge_settings(defaults, ["rows_per_replica=1"]))
        return {**row, "first_attempt_error": first}

    def score(self, model: str, mode: str, n: int, kernel: str) -> dict:
        scorer = self.scorer(model, kernel)
        cfg, mcfg = scorer.module.config, scorer.mcfg
        rng = np.random.default_rng(self.args.seed + n)
        window = lambda: rng.integers(0, cfg.vocab_size, (1, n), dtype=np.int32)
        before = gpu_memory()
        known = set(scorer._executables)
        start = time.perf_counter()
        _, nll = scorer.window_nll(mode, window())
        nll = np.asarray(nll)
        compile_s = scorer.last_compile_seconds
        first_s = time.perf_counter() - start - compile_s
        seconds, means = [], [float(nll.astype(np.float64).mean())]
        least = 0 if mode == "full" else 1   # full: its first run may be the only one
        for i in range(self.timed_runs(1 if mode == "full" else 3)):
            if i >= least and self.budget.left() <= 0:
                break
            ids = window()
            start = time.perf_counter()
            _, nll = scorer.window_nll(mode, ids)
            nll = np.asarray(nll)
            seconds.append(time.perf_counter() - start - scorer.last_compile_seconds)
            compile_s += scorer.last_compile_seconds
            means.append(float(nll.astype(np.float64).mean()))
        after = gpu_memory()
        from_first = not seconds
        median = statistics.median(seconds or [first_s])
        predictions = scorer.protocol.predictions(n)
        flops = score_flops(cfg, mcfg, mode, n, scorer.protocol.local_window, predictions)
        programs = {f"{k[0]}:{k[1]}": program_bytes(c) for k, c in scorer._executables.items()
                    if k not in known or k[0] == mode or (mode == "memlong" and k[0] == "ingest")}
        return {"kind": "score", "model": model, "mode": mode, "length": n,
                "attention_kernel": kernel,
                "local_window": scorer.protocol.final_window(n), "predictions": predictions,
                "dtype": "bfloat16", "memlong": mcfg.to_dict() if mode == "memlong" else None,
                "compile_s": compile_s, "first_run_s": first_s, "seconds": seconds,
                "timed_from_first_run": from_first, "median_s": median,
                "tokens_per_s": n / median,
                "flops": flops, **efficiency(flops["total"], median, self.peak, self.nominal),
                **memory_fields(before, after), "programs": programs,
                "mean_nll": means, "nll_finite": bool(np.isfinite(means).all())}

    def train(self, preset: str, defaults: list[str]) -> dict:
        from bench import train_step
        from memlong_jax.llama.config import DTYPES
        from train import metrics
        from train.lora import count

        overrides = merge_settings(MODEL_TRAIN_OVERRIDES + defaults, self.args.train_set)
        load = lambda run, model: random_params(model, DTYPES[run.train.param_dtype],
                                                run.train.seed)
        before = gpu_memory()
        start = time.perf_counter()
        run, model, step, state, frozen, mem, batch = train_step.build(preset, overrides, load)
        build_s = time.perf_counter() - start
        t = run.train
        timed = train_step.time_steps(step, state, frozen, mem, batch, self.timed_runs(5),
                                      go_on=lambda i: self.budget.left() > 0)
        compiled, compile_s, first_s, times, state, out = (timed[k] for k in (
            "compiled", "compile_s", "first_s", "times", "state", "out"))
        after = gpu_memory()
        flops = metrics.step_flops(model, run.memlong, t)
        timing = common.summary(times)
        return {"kind": "train", "preset": preset, "overrides": overrides,
                "seq_len": t.seq_len, "grad_accum": t.grad_accum, "rows": t.rows_per_replica,
                "trainable": t.trainable, "dtype": t.dtype, "param_dtype": t.param_dtype,
                "remat": t.remat, "memlong": run.memlong.to_dict(),
                "params_trainable": count(state["trainable"]), "params_frozen": count(frozen),
                "build_s": build_s, "compile_s": compile_s, "first_run_s": first_s,
                "seconds": times, **timing,
                "tokens_per_step": flops["tokens_per_replica"],
                "tokens_per_s": flops["tokens_per_replica"] / timing["median_s"],
                "flops_per_token": flops["flops_per_token"],
                "flops": {"total": flops["flops_per_replica_step"]},
                **efficiency(flops["flops_per_replica_step"], timing["median_s"], self.peak,
                             self.nominal),
                **memory_fields(before, after), "programs": {"train_step": program_bytes(compiled)},
                "final_loss": float(out["loss"]),
                "nll_finite": bool(np.isfinite(float(out["loss"])))}


def merge_settings(defaults: list[str], extra: list[str]) -> list[str]:
    """key=value lists, later keys replacing earlier ones (train.config.resolve rejects repeats)."""
    merged: dict = {}
    for item in [*defaults, *extra]:
        merged[item.partition("=")[0].strip()] = item
    return list(merged.values())


# ---- output -----------------------------------------------------------------------------------

def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def line(row: dict) -> str:
    if "error" in row or "skipped" in row:
        status = f"ERROR: {row['error']}" if "error" in row else f"skipped: {row['skipped']}"
        return f"{row['name']:<34} {status}"
    peak = row.get("peak_gpu_gib")
    memory = (f"peak {peak:.2f} GiB" if peak is not None else
              f"peak <= {row['peak_gpu_upper_bound_gib']:.2f} GiB"
              if row.get("peak_gpu_upper_bound_gib") is not None else "peak n/a")
    return (f"{row['name']:<34} {row['median_s']:8.3f} s  {row['tokens_per_s']:>11,.0f} tok/s  "
            f"{row['tflops']:8.2f} TFLOP/s  MFU {pct(row['mfu_measured_peak']):>6} measured / "
            f"{pct(row['mfu_nominal_peak']):>6} nominal  {memory}  "
            f"compile {row['compile_s']:.1f} s" + (
                f"  NLL vs auto {row['mean_nll_max_diff_vs_auto']:.1e}"
                if "mean_nll_max_diff_vs_auto" in row else ""))


def measure_peak(quick: bool) -> dict:
    """Worker: this device, its memory and its matmul peak (bf16 on a GPU, fp32 on a CPU)."""
    import jax
    from train import metrics
    on_gpu = jax.default_backend() == "gpu"
    kind = jax.devices()[0].device_kind
    reply = {"devices": common.jax_devices(), "device_kind": kind,
             "device_memory": gpu_memory(), "nominal_peak_tflops": metrics.peak_tflops(kind, 0.0)}
    try:
        reply["matmul_peak"] = common.matmul_peak((4096, 8192) if on_gpu else (256, 512),
                                                  dtype="bfloat16" if on_gpu else "float32")
    except Exception as err:
        reply["matmul_peak"] = {"error": f"{type(err).__name__}: {err}"}
    reply["fused_accuracy"] = fused_accuracy(quick)
    return reply


def fused_accuracy(quick: bool) -> list[dict]:
    """bench/fused_accuracy.py's bf16 errors of the fused kernel (cuDNN on a GPU) and the dense
    path at OpenLLaMA-3B's attention shape (32 heads of 100; a 2048-token window, 8 chunks of
    128 memory slots, shared or per query chunk of 128), `tiny`-sized with --quick."""
    from bench.fused_accuracy import MEMORY_FORMS, bf16_errors
    from memlong_jax.llama.fused import implementation
    shape = (dict(length=256, heads=4, kv_heads=2, slots=32, chunks=4) if quick else
             dict(length=2048, heads=32, kv_heads=32, slots=1024, chunks=16))
    cases = []
    for memory in MEMORY_FORMS:
        try:
            cases.append(bf16_errors(memory, implementation(), **shape))
        except Exception as err:
            cases.append({"memory": memory, "error": f"{type(err).__name__}: {err}"[:1000]})
    return cases


def run_group(job: dict) -> dict:
    """Worker: one group's measurements in order, each skipped once the budget is spent.
    A failed measurement is recorded as an error and the next one runs."""
    args = argparse.Namespace(**job["args"])
    budget = Budget(job["budget_left_s"], time.perf_counter())
    peak = job["peak"] if job["peak"] and "error" not in job["peak"] else None
    runner = Runner(args, budget, plan(args.quick), peak, job["nominal"])
    local_tflops: dict = {}   # model -> TFLOP/s of `local`, to estimate `full`
    rows = []
    for item in job["group"]:
        name = measurement_name(item)
        min_left = item[4] if item[0] == "score" else 0
        estimate = (full_estimate_s(item[1], item[3], runner.layout, local_tflops)
                    if item[0] == "score" and item[2] == "full" else None)
        need = max(min_left, estimate or 0)
        if budget.left() < need or budget.left() <= 0:
            row = {"name": name, "skipped": f"budget: {job['budget_s'] - budget.left():.0f} s "
                   f"of {job['budget_s']:.0f} s used" + (f", needs {need:.0f} s left" if need
                                                         else "") +
                   (" (estimated from `local`)" if estimate else "")}
        else:
            try:
                row = {"name": name,
                       "started_at_s": job["budget_s"] - budget.left(),
                       **(runner.train_with_fallback(item[1], item[2]) if item[0] == "train"
                          else runner.score(*item[1:4], item[5]))}
            except Exception as err:
                traceback.print_exc()
                row = {"name": name, "error": f"{type(err).__name__}: {err}"[:2000]}
                runner.release()
        if row.get("mode") == "local":
            local_tflops[row["model"]] = row["tflops"]
        rows.append(row)
        print(line(row), file=sys.stderr, flush=True)
    nll_agreement(rows)
    return {"rows": rows}


def nll_agreement(rows: list[dict]) -> None:
    """A score row of another kernel gets `mean_nll_max_diff_vs_auto`: how far its per-window
    mean NLL lies from the default kernel's on the same windows (same seeded token ids),
    where both ran in this group; bf16 noise is expected, a wrong kernel shows."""
    key = lambda r: (r.get("model"), r.get("mode"), r.get("length"))
    auto = {key(r): r for r in rows if r.get("attention_kernel") == "auto"}
    for row in rows:
        other = auto.get(key(row))
        if row.get("attention_kernel", "auto") != "auto" and other:
            row["mean_nll_max_diff_vs_auto"] = max(
                abs(a - b) for a, b in zip(row["mean_nll"], other["mean_nll"]))


def full_estimate_s(model: str, n: int, layout: dict, local_tflops: dict) -> float | None:
    """Lower bound on compile + one run of `full`: its FLOPs at the rate `local` reached
    (blockwise attention runs slower than that), plus 30 s of compilation."""
    if model not in local_tflops:
        return None
    cfg, mcfg = model_config(model)
    w = layout["window"]
    flops = score_flops(cfg, mcfg, "full", n, w, min(layout["scored"], w) - 1)
    return 30 + flops["total"] / (local_tflops[model] * 1e12)


def main() -> None:
    job = common.worker_job()
    if job is not None:
        common.worker_reply(measure_peak(job["quick"]) if job.get("peak_only")
                            else run_group(job))
        return
    args = build_parser().parse_args()
    started = time.perf_counter()
    budget = Budget(args.budget_s, started)
    args.out = args.out or common.default_out(NAME, args.quick)
    script = os.path.abspath(__file__)
    layout = plan(args.quick)

    # This process never touches the device: each worker gets the whole of it, and its own
    # peak-memory mark (`memory_stats()` peaks cannot be reset within a process).
    device = common.run_worker(script, {"peak_only": True, "quick": args.quick},
                               timeout=args.timeout)
    if "devices" not in device:
        sys.exit(f"{NAME}: the device probe failed: {device.get('error')}")
    config = {"device_kind": device["device_kind"],
              "jax_backend": device["devices"]["jax_backend"],
              "device_memory": device["device_memory"], "budget_s": args.budget_s,
              "local_window": layout["window"], "scored_tokens": layout["scored"],
              "weights": "seeded random init of each preset's shape, bf16 (no checkpoint)",
              "retriever": "hidden (in-graph; no text encoder)", "retrieval_backend": "device",
              "token_ids": "uniform random", "process_per_group": True, "xla_mem_fraction":
                  os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
              "xla_flags": os.environ.get("XLA_FLAGS")}
    data = common.record(NAME, args, config, devices=device["devices"])
    results = {"matmul_peak": device["matmul_peak"],
               "nominal_peak_tflops": device["nominal_peak_tflops"],
               "fused_accuracy": device["fused_accuracy"], "measurements": [],
               "in_progress": None}
    data["results"] = results

    def save():
        data["wall_s"] = time.perf_counter() - started
        common.write_json(args.out, data)

    peak = device["matmul_peak"]
    if "error" not in peak:
        print(f"matmul peak: {peak['gflops'] / 1e3:.1f} TFLOP/s {peak['dtype']} "
              f"(n = {peak['best_n']}); nominal {device['nominal_peak_tflops']} TFLOP/s "
              f"({device['device_kind']})", flush=True)
    for case in device["fused_accuracy"]:
        print(f"fused attention, memory {case['memory']}: " + (
            f"ERROR: {case['error']}" if "error" in case else
            f"bf16 max/mean abs error {case['fused_max_abs_error']:.2e}/"
            f"{case['fused_mean_abs_error']:.2e} ({case['implementation']}), dense path "
            f"{case['dense_max_abs_error']:.2e}/{case['dense_mean_abs_error']:.2e}"), flush=True)
    save()

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    for group in layout["groups"]:
        chosen = [item for item in group
                  if not only or any(s in measurement_name(item) for s in only)]
        if not chosen:
            continue
        names = [measurement_name(item) for item in chosen]
        results["in_progress"] = names
        save()
        reply = common.run_worker(script, {
            "args": vars(args), "group": chosen, "budget_s": args.budget_s,
            "budget_left_s": budget.left(), "peak": peak,
            "nominal": device["nominal_peak_tflops"]},
            timeout=max(budget.left(), 0) + args.timeout)
        rows = reply.get("rows") or [{"name": n, "error": reply.get("error")} for n in names]
        for row in rows:
            row["worker_peak_rss_mb"] = reply["peak_rss_mb"]
        results["measurements"].extend(rows)
        results["in_progress"] = None
        save()

    print(f"\n{NAME} on {device['device_kind']} ({config['jax_backend']}), "
          f"{budget.elapsed():.0f} s; wrote {os.path.relpath(args.out)}", flush=True)
    for row in results["measurements"]:
        print(line(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
