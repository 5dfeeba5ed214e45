"""Generation speed with memory: time to first token and decode tokens/s of memlong-jax's
`Generator` for long prompts, next to transformers `generate` on the same model and prompt.

    .venv/bin/python -m bench.generation              # full run -> bench/results/generation.json
    .venv/bin/python -m bench.generation --quick      # smoke test -> out/bench-quick/

Why: generation speed had never been measured (issue 19): the targets are ratios in one run
(decode with a 2k prompt at least 2x transformers' tokens/s; decode with a 128k prompt within 20%
of the 2k figure, i.e. memory keeps decoding flat).

What runs, per prompt length N (real text: the pg19_like books of `bench.scoring`), each in its
own process (`common.run_worker`, for its peak RSS), greedy, batch 1, `--new-tokens` tokens with
no stop token:

- memlong: `memlong_jax.eval.generation.Generator` with the checkpoint's MemLong settings (text
  retriever, all-MiniLM-L6-v2 on the host), local KV cache `--window`: the prompt's first tokens go
  through memory, the rest into the cache; each full cache spills a chunk into memory. The whole
  generation runs once untimed first (it compiles every shape the timed run uses), then once
  timed: time to first token = prompt ingestion + first token; decode = the other tokens,
  spills and retrieval included.
- torch: transformers `AutoModelForCausalLM` from the same SmolLM2 GGUF, fp32, sdpa,
  `generate(do_sample=False)` with its KV cache, up to `--torch-context` (the model's trained
  context; past it a transformers user has no memory to fall back on). Time to first token =
  `generate(max_new_tokens=1)`; decode tokens/s = (n - 1) / (t(n) - t(1)), after one warm-up.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from bench import common
from bench.scoring import book_tokens

NAME = "generation"
ENGINES = ("memlong", "torch")


def build_parser():
    p = common.parser(__doc__, NAME)
    p.add_argument("--lengths", default="2k,32k,128k", help="prompt lengths (default: %(default)s)")
    p.add_argument("--engines", default=",".join(ENGINES), help="default: %(default)s")
    p.add_argument("--new-tokens", type=int, default=128,
                   help="tokens generated per prompt (default: %(default)s)")
    p.add_argument("--window", default="2k", help="memlong's local KV cache (default: %(default)s)")
    p.add_argument("--torch-context", default="8k",
                   help="longest prompt given to transformers (default: %(default)s, the "
                        "model's max_position_embeddings)")
    p.add_argument("--checkpoint", default=common.SMOLLM2_CKPT)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    return p


def quick_args(args):
    args.lengths, args.new_tokens, args.window, args.torch_context = "512,1k", 8, "256", "1k"
    return args


# ---- workers ----------------------------------------------------------------------------------

def memlong_worker(job: dict) -> dict:
    import memlong_jax as ml
    from memlong_jax.eval.generation import Generator
    from memlong_jax.presets import load_for_checkpoint

    model = ml.load(job["checkpoint"])
    mcfg = load_for_checkpoint(job["checkpoint"], model.config).validate(model.config)
    retriever = model.retriever(mcfg)
    retriever.encoder   # the text encoder loads now, not inside the timings (hidden: None)
    generator = Generator(model.module, mcfg, job["window"], retriever)
    prompt = np.asarray(np.load(job["tokens"], mmap_mode="r")[:job["length"]])[None]

    def run():
        start, stamps, out = time.perf_counter(), [], []
        for tokens in generator.tokens(model.params, prompt, job["new_tokens"]):
            stamps.append(time.perf_counter() - start)
            out.append(int(tokens[0]))
        return stamps, out

    start = time.perf_counter()
    run()
    warm_s = time.perf_counter() - start
    stamps, out = run()
    decode_s = stamps[-1] - stamps[0]
    return {"ttft_s": stamps[0], "decode_s": decode_s,
            "decode_tokens_per_s": (len(stamps) - 1) / decode_s, "warmup_s": warm_s,
            "tokens": out, "memlong": mcfg.to_dict(), "self_peak_rss_mb": common.peak_rss_mb(),
            "load_average": os.getloadavg()}


def torch_worker(job: dict) -> dict:
    import torch   # heavy: only this worker process loads it

    model, device, load_s = common.torch_smollm2()
    ids = torch.as_tensor(np.asarray(np.load(job["tokens"], mmap_mode="r")[:job["length"]],
                                     np.int64)[None], device=device)

    def generate(n):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 attention_mask=torch.ones_like(ids))
        return time.perf_counter() - start, out[0, ids.shape[1]:].tolist()

    start = time.perf_counter()
    generate(2)   # warm-up: allocator, thread pool
    warm_s = time.perf_counter() - start
    ttft, _ = generate(1)
    total, out = generate(job["new_tokens"])
    decode_s = total - ttft
    return {"ttft_s": ttft, "decode_s": decode_s,
            "decode_tokens_per_s": (job["new_tokens"] - 1) / decode_s, "warmup_s": warm_s,
            "load_s": load_s, "tokens": out, "torch_threads": torch.get_num_threads(),
            "device": device, "attn_implementation": model.config._attn_implementation,
            "self_peak_rss_mb": common.peak_rss_mb(), "load_average": os.getloadavg()}


# ---- driver -----------------------------------------------------------------------------------

def plan(args) -> list[dict]:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        sys.exit(f"unknown engine(s) {bad}; choose from {ENGINES}")
    torch_max = common.parse_tokens(args.torch_context)
    return [{"engine": e, "length": n} for n in common.parse_list(args.lengths) for e in engines
            if e != "torch" or n <= torch_max]


def main() -> None:
    job = common.worker_job()
    if job is not None:
        worker = torch_worker if job["engine"] == "torch" else memlong_worker
        common.worker_reply(worker(job))
        return
    args = build_parser().parse_args()
    if args.quick:
        args = quick_args(args)
    if args.new_tokens < 2:
        sys.exit("--new-tokens must be at least 2 (decode speed needs two tokens)")
    started, git = time.perf_counter(), common.git_commit()
    checkpoint = common.require_checkpoint(args.checkpoint)
    jobs = plan(args)
    tokens = book_tokens(checkpoint, max(j["length"] for j in jobs))
    shared = {"tokens": tokens, "checkpoint": checkpoint, "new_tokens": args.new_tokens,
              "window": common.parse_tokens(args.window)}
    peak = common.matmul_peak()
    config = {"checkpoint": os.path.relpath(checkpoint, common.REPO),
              "tokens_file": os.path.relpath(tokens, common.REPO), "matmul_peak": peak,
              **{k: v for k, v in shared.items() if k not in ("tokens", "checkpoint")}}
    rows = []
    for job in jobs:
        row = {**job, **common.run_worker(os.path.abspath(__file__), {**shared, **job},
                                          args.timeout)}
        rows.append(row)
        shown = (f"first token {row['ttft_s']:.2f} s, decode {row['decode_tokens_per_s']:.1f} "
                 f"tok/s" if "ttft_s" in row else row.get("error"))
        print(f"{job['engine']:>7} {common.fmt_tokens(job['length']):>5}: {shown}, "
              f"peak RSS {row['peak_rss_mb']:.0f} MB", file=sys.stderr)
        common.finish(NAME, args, config, rows, started, git)  # after every row: a kill loses one


if __name__ == "__main__":
    main()
