"""Scoring throughput and peak RSS versus window length: memlong, local and full modes of
memlong-jax, next to torch/transformers scoring the same windows with the same model.

    .venv/bin/python -m bench.scoring                 # full run -> bench/results/scoring.json
    .venv/bin/python -m bench.scoring --quick         # smoke test (512 tokens) -> out/bench-quick/

Why: the issue's targets are ratios measured side by side in one run (memlong at least 3x the
torch reference at 16k-32k tokens; time per token flat within 10% from 8k to 128k; peak RSS flat
once memory is full), and RSS is only comparable when every (mode, length) runs in a fresh
process, which is what this script does (`common.run_worker`).

What runs, per length N (each a window of real text: pg19_like books joined,
../shared/data/pg19_like/{les_miserables,war_and_peace,karamazov_brothers}.txt):

- memlong / local / full: `memlong_jax.eval.scoring.Scorer.window_nll`, exactly what
  `python -m memlong_jax.score` runs (the checkpoint's MemLong settings: text retriever,
  all-MiniLM-L6-v2 embeddings made on the host block by block while the previous block is
  ingested, device top-k). The last `--scored-tokens` tokens (minus one) of each window are
  scored. `full` only up to `--full-max` (its cost is quadratic).
- memlong-hidden: memlong with `retriever=hidden` (the in-graph retriever, no encoder), up to
  `--hidden-max`: the rate the text retriever is measured against (issue 19: at least 90%).
  memlong rows with the text retriever also count what the encoder ran in the timed windows
  (word pieces, padded positions) and its FLOPs per LM token beside the ingestion's, so the
  ratio's bound on a machine where both share the cores can be computed from the same file.
- torch: transformers `AutoModelForCausalLM` from the same SmolLM2 GGUF, fp32, default attention
  (sdpa), `inference_mode`, `logits_to_keep` so the head runs only on scored positions. It sees
  the last min(N, `--torch-context`) tokens of the same window and scores the same positions:
  for N <= 8192 that is the whole window (the same computation as `full`); past the model's 8k
  training window a transformers user cannot attend further, so the reference is the same
  scored tokens with the longest context the model supports.

Timing: a warm-up window of min(N, `--warmup-max`) tokens first compiles everything memlong
needs (ingest blocks, the final window, the encoder's padded shapes); `full` has no warm-up
(its one compiled shape is N itself) and its compile time is subtracted instead
(`Scorer.last_compile_seconds`). Then `windows` timed windows, each a fresh memory, windows =
clamp(`--tokens-per-config` / N, 1, `--max-windows`). tokens/s = N / median seconds per window;
for torch `seconds per window` is what the ratio uses (same scored predictions), and its own
tokens/s counts only the context it actually processed.

Estimated wall time of the default run on a quiet 2-core CPU: 55-80 minutes (memlong at 1M,
about 1.3M tokens through ingestion and the host text encoder, and full at 16k-32k dominate;
memlong-hidden at 4k-32k adds about 5).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np

from bench import common

NAME = "scoring"
BOOKS = ("les_miserables", "war_and_peace", "karamazov_brothers")
MODES = ("memlong", "memlong-hidden", "local", "full", "torch")


def build_parser():
    p = common.parser(__doc__, NAME)
    p.add_argument("--lengths", default="4k,8k,16k,32k,64k,128k,1M",
                   help="window lengths N (default: %(default)s)")
    p.add_argument("--modes", default=",".join(MODES), help="default: %(default)s")
    p.add_argument("--full-max", default="32k", help="longest N for `full` (default: %(default)s)")
    p.add_argument("--hidden-max", default="32k",
                   help="longest N for `memlong-hidden` (default: %(default)s)")
    p.add_argument("--torch-context", default="8k",
                   help="most tokens torch attends over (default: %(default)s, the model's "
                        "max_position_embeddings)")
    p.add_argument("--local-window", default="2k", help="default: %(default)s")
    p.add_argument("--scored-tokens", default="2k", help="default: %(default)s")
    p.add_argument("--tokens-per-config", default="32k",
                   help="timed window tokens per (mode, length) (default: %(default)s)")
    p.add_argument("--max-windows", type=int, default=3, help="default: %(default)s")
    p.add_argument("--warmup-max", default="32k", help="longest warm-up window (default: "
                   "%(default)s, enough to compile every shape memlong needs at any N)")
    p.add_argument("--dtype", default="float32", help="JAX compute dtype (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="MemLong setting for memlong mode, e.g. retriever=hidden (repeatable)")
    p.add_argument("--checkpoint", default=common.SMOLLM2_CKPT)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    p.add_argument("--merge", action="store_true",
                   help="rerun some (mode, length) pairs into an existing --out: its other rows "
                        "are kept, the rerun's replace theirs, and the file lists the rerun "
                        "under `reruns` (settings must match)")
    return p


def quick_args(args):
    """Tiny settings: one 512-token window, 256-token local window, every mode."""
    args.lengths, args.full_max, args.local_window, args.scored_tokens = "512", "512", "256", "256"
    args.tokens_per_config, args.max_windows, args.warmup_max = "512", 1, "512"
    return args


# ---- text -------------------------------------------------------------------------------------

def book_tokens(checkpoint: str, needed: int) -> str:
    """Tokenise the books (as many as `needed` tokens take) once, cached as .npy under out/;
    returns the path. Workers memory-map it, so the text never enters their RSS."""
    from memlong_jax.io.tokenizer import load_tokenizer
    folder = os.path.join(common.SHARED_DATA, "pg19_like")
    paths = [os.path.join(folder, f"{b}.txt") for b in BOOKS]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        sys.exit(f"scoring benchmark skipped: real text not found ({', '.join(missing)}); it "
                 "reads ../shared/data/pg19_like relative to the repository")
    tokenizer_file = os.path.join(checkpoint, "tokenizer.json")
    key = hashlib.sha1(repr([(p, os.path.getsize(p)) for p in paths]).encode()
                       + open(tokenizer_file, "rb").read()).hexdigest()[:12]
    cache = os.path.join(common.REPO, "out", "bench-cache")
    os.makedirs(cache, exist_ok=True)
    for count in range(1, len(paths) + 1):
        path = os.path.join(cache, f"pg19_{count}books_{key}.npy")
        if not os.path.exists(path):
            tokenizer = load_tokenizer(checkpoint)
            text = "\n\n".join(open(p, encoding="utf-8").read() for p in paths[:count])
            ids = np.asarray(tokenizer.encode(text).ids, np.int32)
            np.save(path + ".tmp.npy", ids)
            os.replace(path + ".tmp.npy", path)
        if len(np.load(path, mmap_mode="r")) >= needed:
            return path
    sys.exit(f"the books hold {len(np.load(path, mmap_mode='r'))} tokens, {needed} needed")


def plan(args) -> list[dict]:
    lengths = common.parse_list(args.lengths)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        sys.exit(f"unknown mode(s) {bad}; choose from {MODES}")
    full_max, warm_max = common.parse_tokens(args.full_max), common.parse_tokens(args.warmup_max)
    longest = {"full": full_max, "memlong-hidden": common.parse_tokens(args.hidden_max)}
    per_config = common.parse_tokens(args.tokens_per_config)
    jobs = []
    for n in lengths:
        windows = max(1, min(args.max_windows, per_config // n))
        warm = min(n, warm_max)
        for mode in modes:
            if n > longest.get(mode, n):
                continue
            jobs.append({"mode": mode, "length": n, "windows": windows,
                         "warmup": 0 if mode == "full" else warm,
                         "starts": [warm + i * n for i in range(windows)]})
    return jobs


# ---- workers ----------------------------------------------------------------------------------

def count_encoder_work(encoder) -> dict:
    """Count what `encoder.embed_ids` runs from now on (wraps it on this instance): sequences,
    real word pieces and executed (padded) positions, and the sums of their squares, which
    the attention products grow with."""
    counts = dict.fromkeys(("sequences", "pieces", "pieces_sq", "positions", "positions_sq"), 0)
    embed = encoder.embed_ids

    def counted(ids, mask):
        lengths = np.asarray(mask).sum(1).astype(np.int64)
        rows, width = np.shape(ids)
        counts["sequences"] += int((lengths > 0).sum())
        counts["pieces"] += int(lengths.sum())
        counts["pieces_sq"] += int((lengths ** 2).sum())
        counts["positions"] += rows * width
        counts["positions_sq"] += rows * width * width
        return embed(ids, mask)

    encoder.embed_ids = counted
    return counts


def encoder_flops(config, positions: int, positions_sq: int) -> float:
    """Forward FLOPs of a BERT encoder (`TextEncoderConfig`) over `positions` token positions
    in sequences whose squared lengths sum to `positions_sq`: 2 per weight of each layer (q, k,
    v, o and the two FFN matrices) and 4 * d per pair of positions (scores and the weighted
    sum); embedding lookups, norms and pooling not counted."""
    d, ff = config.hidden_size, config.intermediate_size
    return config.num_hidden_layers * (2 * (4 * d * d + 2 * d * ff) * positions
                                       + 4 * d * positions_sq)


def encoder_work(config, counts: dict, tokens: int) -> dict:
    """Per LM token of the windows `counts` covers: word pieces, and the encoder's FLOPs as
    executed (padded batches) and as needed (the real pieces only)."""
    return {"word_pieces_per_token": counts["pieces"] / tokens,
            "positions_per_token": counts["positions"] / tokens,
            "mflop_per_token_executed": encoder_flops(
                config, counts["positions"], counts["positions_sq"]) / tokens / 1e6,
            "mflop_per_token_needed": encoder_flops(
                config, counts["pieces"], counts["pieces_sq"]) / tokens / 1e6, **counts}


def jax_worker(job: dict) -> dict:
    import memlong_jax as ml
    from bench.ingestion import prefix_flops_per_token
    from memlong_jax.eval import scoring
    from memlong_jax.presets import load_for_checkpoint
    from memlong_jax.settings import apply_overrides

    tokens = np.load(job["tokens"], mmap_mode="r")
    model = ml.load(job["checkpoint"], job["dtype"])
    n, mode = job["length"], job["mode"]
    overrides = job["overrides"] + (["retriever=hidden"] if mode == "memlong-hidden" else [])
    mode = "memlong" if mode == "memlong-hidden" else mode
    mcfg = apply_overrides(load_for_checkpoint(job["checkpoint"], model.config), overrides)
    mcfg = mcfg.validate(model.config)
    protocol = scoring.Protocol((n,), job["local_window"], job["scored_tokens"]).validate(
        mcfg.chunk_size)
    retriever = model.retriever(mcfg)
    if mode == "memlong":
        retriever.encoder   # the text encoder loads now, outside the timings (hidden: None)
    scorer = scoring.Scorer(model.module, model.params, mcfg, protocol, retriever)
    window = lambda start, length: np.asarray(tokens[start:start + length])[None]

    compile_s, warm_s = 0.0, None
    if job["warmup"]:
        start = time.perf_counter()
        np.asarray(scorer.window_nll(mode, window(0, job["warmup"]))[1])
        warm_s, compile_s = time.perf_counter() - start, scorer.last_compile_seconds
    counts = (count_encoder_work(retriever.encoder) if mode == "memlong" and retriever.host_side
              else None)
    seconds, nll = [], []
    for begin in job["starts"]:
        start = time.perf_counter()
        out = np.asarray(scorer.window_nll(mode, window(begin, n))[1])
        compile_s += scorer.last_compile_seconds
        seconds.append(time.perf_counter() - start - scorer.last_compile_seconds)
        nll.append(float(out.mean()))
    flops = {}
    if mode == "memlong":
        flops["ingest_mflop_per_prefix_token"] = prefix_flops_per_token(
            model.config, mcfg)["total"] / 1e6
    if counts is not None:
        flops["encoder"] = encoder_work(retriever.encoder.config, counts, n * len(seconds))
    return {"seconds": seconds, "compile_s": compile_s, "warmup_s": warm_s,
            "context_tokens": n if mode != "local" else protocol.final_window(n),
            "predictions": protocol.predictions(n), "mean_nll": nll,
            "memlong": mcfg.to_dict() if mode == "memlong" else None, **flops,
            "self_peak_rss_mb": common.peak_rss_mb()}


def torch_worker(job: dict) -> dict:
    import torch

    tokens = np.load(job["tokens"], mmap_mode="r")
    n = job["length"]
    context = min(n, job["torch_context"])
    predictions = min(job["scored_tokens"], job["local_window"], n) - 1
    model, device, load_s = common.torch_smollm2()

    def score(ids):
        ids = torch.as_tensor(np.asarray(ids[-context:], np.int64)[None], device=device)
        with torch.inference_mode():
            logits = model(ids, logits_to_keep=predictions + 1).logits[0, :-1].float()
            nll = -torch.log_softmax(logits, -1).gather(-1, ids[0, -predictions:, None])
        return float(nll.mean())

    start = time.perf_counter()
    score(tokens[:min(context, 2 * predictions + 2)])   # warm-up: allocator, thread pool
    warm_s = time.perf_counter() - start
    seconds, nll = [], []
    for begin in job["starts"]:
        start = time.perf_counter()
        nll.append(score(tokens[begin:begin + n]))
        seconds.append(time.perf_counter() - start)
    return {"seconds": seconds, "compile_s": 0.0, "warmup_s": warm_s, "load_s": load_s,
            "context_tokens": context, "predictions": predictions, "mean_nll": nll,
            "torch_threads": torch.get_num_threads(), "device": device,
            "attn_implementation": model.config._attn_implementation,
            "self_peak_rss_mb": common.peak_rss_mb()}


# ---- driver -----------------------------------------------------------------------------------

def main() -> None:
    job = common.worker_job()
    if job is not None:
        common.worker_reply(torch_worker(job) if job["mode"] == "torch" else jax_worker(job))
        return
    args = build_parser().parse_args()
    if args.quick:
        args = quick_args(args)
    started, git = time.perf_counter(), common.git_commit()
    checkpoint = common.require_checkpoint(args.checkpoint)
    jobs = plan(args)
    needed = max(j["starts"][-1] + j["length"] for j in jobs)
    tokens = book_tokens(checkpoint, needed)
    peak = common.matmul_peak((512, 1024) if args.quick else (1024, 2048, 3072))
    shared = {"tokens": tokens, "checkpoint": checkpoint, "dtype": args.dtype,
              "overrides": args.overrides, "local_window": common.parse_tokens(args.local_window),
              "scored_tokens": common.parse_tokens(args.scored_tokens),
              "torch_context": common.parse_tokens(args.torch_context)}
    rows = []
    for job in jobs:
        result = common.run_worker(os.path.abspath(__file__), {**shared, **job}, args.timeout)
        row = {"mode": job["mode"], "length": job["length"], "windows": job["windows"], **result,
               "load_average": list(os.getloadavg())}
        if "seconds" in result:
            median = float(np.median(result["seconds"]))
            row.update(median_s=median, tokens_per_s=job["length"] / median,
                       context_tokens_per_s=result["context_tokens"] / median,
                       ms_per_token=1e3 * median / job["length"])
        rows.append(row)
        shown = (f"{row['median_s']:.2f} s/window, {row['tokens_per_s']:.0f} tok/s"
                 if "median_s" in row else row.get("error"))
        print(f"{job['mode']:>14} {common.fmt_tokens(job['length']):>5}: {shown}, "
              f"peak RSS {row['peak_rss_mb']:.0f} MB", file=sys.stderr)
    config = {"checkpoint": os.path.relpath(checkpoint, common.REPO), "books": list(BOOKS),
              "tokens_file": os.path.relpath(tokens, common.REPO),
              "matmul_peak": peak,
              **{k: v for k, v in shared.items() if k not in ("tokens", "checkpoint")}}
    if args.merge:
        merge_into(args.out or common.default_out(NAME, args.quick), args, config, rows, started,
                   git)
    else:
        common.finish(NAME, args, config, rows, started, git)


def merged(old: dict, rerun: dict) -> dict:
    """`old` with `rerun`'s rows replacing the rows of the same (mode, length), every row
    tagged with the rerun that measured it, and `rerun`'s header appended to `reruns`."""
    comparable = ("local_window", "scored_tokens", "torch_context", "dtype", "overrides",
                  "books", "checkpoint")
    differ = [k for k in comparable if old["config"].get(k) != rerun["config"].get(k)]
    if differ:
        raise ValueError(f"settings differ from the existing results: {', '.join(differ)}")
    replaced = {(r["mode"], r["length"]) for r in rerun["results"]}
    index = len(old.get("reruns", [])) + 1
    rows = [r for r in old["results"] if (r["mode"], r["length"]) not in replaced]
    rows += [{**r, "rerun": index} for r in rerun["results"]]
    order = {m: i for i, m in enumerate(MODES)}
    rows.sort(key=lambda r: (r["length"], order.get(r["mode"], len(order))))
    header = {k: v for k, v in rerun.items() if k != "results"}
    header["rows"] = [f"{r['mode']} {common.fmt_tokens(r['length'])}" for r in rerun["results"]]
    return {**old, "results": rows, "reruns": [*old.get("reruns", []), header]}


def merge_into(path: str, args, config: dict, rows: list, started: float, git: dict) -> None:
    if not os.path.isfile(path):
        sys.exit(f"--merge: no results to merge into at {path}")
    with open(path) as f:
        old = json.load(f)
    rerun = {**common.record(NAME, args, config, git=git), "results": rows,
             "wall_s": time.perf_counter() - started}
    try:
        data = merged(old, rerun)
    except ValueError as err:
        sys.exit(f"--merge: {err}")
    common.write_json(path, data)
    print(f"{NAME}: merged {len(rows)} rows into {os.path.relpath(path)}", file=sys.stderr)


if __name__ == "__main__":
    main()
