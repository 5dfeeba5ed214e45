"""Write docs/block_memory.md from experiments/results/block/ (experiments/block.sh: recall
JSON of `python -m memlong_jax.recall --rows ...,block`, score JSON of `python -m
memlong_jax.score --modes ...,block`, bench/block_cost.py's JSON and the passkey diagnosis).

    python -m experiments.block_report [--results experiments/results/block] [--out docs/block_memory.md]
"""

from __future__ import annotations

import argparse
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

INTRO = """# Block memory: a training-free long memory (`block` mode)

`memlong_jax.memlong.blockmem` gives any converted LLaMA a long memory without training, after
InfLLM (thunlp/InfLLM): in every layer, `sink_tokens` initial tokens, a local window at true
relative positions, and every 128-token block that leaves the window in a bounded memory
(MemLong's `memory.Memory` bookkeeping and eviction), one memory row per KV group. A block's
retrieval key is the mean of the keys that received the most attention from the block's own
queries. Each 128-token chunk attends, in one softmax with the sinks and the window, to the
blocks its layer and KV group chose with the *previous* chunk's queries (summed over that chunk
and the group's heads): nothing leaks. With `previous=true` (the default) the budget of `top_k`
blocks goes to the `top_k / 2` best and the block written just before each (see the passkey
diagnosis). Retrieved blocks and sinks sit at position 0 of the chunk's frame (window at
1..W), so every distance stays inside the trained range. Generation refreshes the choice per
chunk, and once before the prompt's last token with the prompt's last partial chunk.

Rows: `python -m memlong_jax.recall --rows full,local,block --block key=value` and
`python -m memlong_jax.score --modes memlong,local,block --block key=value`.
Settings: {settings}.

All numbers: SmolLM2-135M (the converted checkpoint), float32, no training, on the shared 2-core
CPU **under load** (a training run and other helpers' jobs; load average {load}): times are not
speed measurements, they are comparable only within one run. Items per cell are few (one,
what the CPU time allowed): read accuracies as examples, not rates.
"""


def load(path: str):
    return json.load(open(path)) if os.path.exists(path) else None


def label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def recall_cells(run, metric: str) -> dict:
    """{(row, length): (mean metric, items)} over depths."""
    cells: dict = {}
    for c in run["summary"] if run else []:
        if "n/a" not in c:
            cells.setdefault((c["row"], c["length"]), []).append((c[metric], c["items"]))
    return {k: (sum(v for v, _ in vs) / len(vs), sum(n for _, n in vs)) for k, vs in cells.items()}


def seconds(run) -> dict:
    return {(t["row"], t["length"]): t["seconds"] for t in run["timing"]} if run else {}


def merged(runs):
    """Recall runs (each at its own lengths) as one: summaries, records and timing joined; the
    first run's config."""
    if not runs:
        return None
    join = lambda key: [x for run in runs for x in run[key]]
    return {**runs[0], "summary": join("summary"), "records": join("records"),
            "timing": join("timing")}


def changed_settings(run, base) -> str:
    """The block settings in which `run` differs from `base` (the run the intro reports)."""
    mine, theirs = run["config"]["settings"]["block"], base["config"]["settings"]["block"]
    return ", ".join(f"`{k}={v}`" for k, v in mine.items() if theirs.get(k) != v)


def passkey_section(runs) -> list[str]:
    if not runs:
        return ["## Passkey", "", "not run", ""]
    run = merged(runs)
    acc, time = recall_cells(run, "accuracy"), seconds(run)
    answers: dict = {}
    for r in run["records"]:
        if "generated" in r:
            answers.setdefault((r["row"], r["length"]), []).append(
                f"{r['answer']} -> {r['generated'].strip()[:20]!r}")
    settings = {(t["row"], t["length"]): changed_settings(other, runs[0])
                for other in runs[1:] for t in other["timing"]}
    lines = ["## Passkey (landmark format, depth 50%)", "",
             "| length | row | items | accuracy | answers (key -> generated) | s (under load) | "
             "settings other than above |", "|---|---|---|---|---|---|---|"]
    for (row, length), (value, items) in sorted(acc.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(f"| {label(length)} | {row} | {items} | {value:.0%} | "
                     f"{'; '.join(answers.get((row, length), []))} | "
                     f"{time.get((row, length), 0):.0f} | {settings.get((row, length), '')} |")
    lines.append(f"\n`full` is n/a past the model's {run['config']['max_context']} positions.")
    return lines + [""]


def repeat_section(run) -> list[str]:
    if not run:
        return ["## Repeat", "", "not run", ""]
    gain, time = recall_cells(run, "copy_gain"), seconds(run)
    lines = ["## Repeat (copy gain = NLL of the first copy - NLL of the second, nats/token)", "",
             "| length | row | items | copy gain | share of the local-full gap closed | "
             "s (under load) |", "|---|---|---|---|---|---|"]
    for (row, length), (value, items) in sorted(gain.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        local, full = gain.get(("local", length)), gain.get(("full", length))
        share = "" if not local or not full or full[0] == local[0] or row in ("local", "full") \
            else f"{(value - local[0]) / (full[0] - local[0]):.0%}"
        lines.append(f"| {label(length)} | {row} | {items} | {value:.3f} | {share} | "
                     f"{time.get((row, length), 0):.0f} |")
    return lines + [""]


def ppl_section(runs) -> list[str]:
    lines = ["## Perplexity (held-out book jane_eyre, first window, last 2047 predictions)", "",
             "| length | mode | windows | PPL | ms per window token (under load) | "
             "compile s |", "|---|---|---|---|---|---|"]
    for run in runs:
        for row in run["rows"]:
            per_token = 1e3 * row["seconds"] / (row["length"] * row["windows"])
            lines.append(f"| {label(row['length'])} | {row['mode']} | {row['windows']} | "
                         f"{row['ppl']:.3f} | {per_token:.1f} | {row['compile_seconds']:.0f} |")
    return lines + [""]


def cost_section(cost, passkey) -> list[str]:
    lines = ["## Cost per token", ""]
    if cost:
        res = cost["results"]
        memlong = res["memlong"]["flops_per_token"]["total"]
        lines += ["FLOPs per token by formula (bench/block_cost.py: every token through all "
                  "layers, attention over every key slot the fixed shapes hold, head on every "
                  "token as scoring runs it), by memory capacity; a capacity of C tokens is what "
                  "a C-token document needs, and every chunk runs on the same shapes whatever "
                  "came before it.", "",
                  "| capacity | GFLOP per token | layers + head | attention | x MemLong at "
                  f"{label(res['memlong']['length'])} |", "|---|---|---|---|---|"]
        for r in res["block"]:
            f = r["flops_per_token"]
            lines.append(f"| {label(r['capacity'])} | {f['total'] / 1e9:.3f} | "
                         f"{f['matmul'] / 1e9:.3f} | {f['attention'] / 1e9:.3f} | "
                         f"{f['total'] / memlong:.1f} |")
        lines += ["", f"MemLong ({label(res['memlong']['length'])} window, the checkpoint's "
                  f"settings: prefix through {res['memlong']['memlong']['memory_layer']} layers, "
                  f"final window through all): {memlong / 1e9:.3f} GFLOP per token.", ""]
    if passkey:
        per_token = lambda run: ", ".join(
            f"{label(t['length'])}: {1e3 * t['seconds'] / t['length']:.0f} ms"
            for t in run["timing"] if t["row"] == "block")
        lines += ["Block row wall time per prompt token in the passkey runs (compilation "
                  "included, one item, under load): " + "; ".join(
                      f"{per_token(run)} (memory capacity "
                      f"{run['config']['settings']['block']['memory_tokens']} tokens, "
                      f"{run['config']['settings']['block']['mem_dtype']})" for run in passkey)
                  + ".", ""]
    return lines


def diagnosis_section(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    lines = ["## Passkey diagnosis (one 4k item, depth 50%, window 512)", "",
             "The key line straddles two blocks (15 and 16 at 4k). `in top picks`: share of "
             "(layer, KV group) rows whose picks hold one of them.", "",
             "| settings | answer | right | in top picks | what it shows |", "|---|---|---|---|---|"]
    for line in open(path):
        r = json.loads(line)
        share = "" if r.get("in_top_picks") is None else f"{r['in_top_picks']:.0%}"
        lines.append(f"| {label(r['length'])} {' '.join(r['over'])} | {r['answer'].strip()!r} | "
                     f"{'yes' if r['correct'] else 'no'} | {share} | {r['note']} |")
    return lines + [""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default=os.path.join(HERE, "results", "block"))
    parser.add_argument("--out", default=os.path.join(HERE, "..", "docs", "block_memory.md"))
    parser.add_argument("--notes", default=os.path.join(HERE, "block_notes.md"),
                        help="hand-written targets/discussion appended verbatim")
    args = parser.parse_args(argv)
    at = lambda name: os.path.join(args.results, name)
    repeat, cost = load(at("repeat.json")), load(at("cost.json"))
    passkey = [json.load(open(p)) for p in sorted(glob.glob(at("passkey*.json")))]
    ppl = [json.load(open(p)) for p in sorted(glob.glob(at("ppl_*.json")))]
    recall_runs = passkey + ([repeat] if repeat else [])
    settings = (recall_runs[0]["config"]["settings"]["block"] if recall_runs
                else ppl[0]["config"]["block"] if ppl else {})
    loads = [r["config"]["load_average"][0] for r in recall_runs if r["config"].get("load_average")]
    text = [INTRO.format(settings=", ".join(f"`{k}={v}`" for k, v in settings.items()),
                         load=", ".join(f"{x:.0f}" for x in loads) or "not recorded")]
    text += (passkey_section(passkey) + repeat_section(repeat) + ppl_section(ppl)
             + cost_section(cost, passkey) + diagnosis_section(at("passkey_diagnosis.jsonl")))
    if os.path.exists(args.notes):
        text.append(open(args.notes).read())
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(text))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
