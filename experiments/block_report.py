"""Write docs/block_memory.md from experiments/results/block_*.json (block_recall.py and
`python -m memlong_jax.score --modes block,...` outputs).

    python experiments/block_report.py [--results experiments/results] [--out docs/block_memory.md]
"""

from __future__ import annotations

import argparse
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

INTRO = """# Block memory: a training-free long memory (`block` mode)

`memlong_jax.blockmem` gives any converted LLaMA a long memory without training, after InfLLM
(thunlp/InfLLM): in every layer, `sink_tokens` initial tokens, a local window at true relative
positions, and every 128-token block that leaves the window in a bounded memory (MemLong's
`memory.Memory` bookkeeping and eviction), one memory row per KV group. A block's retrieval key
is the mean of the keys that received the most attention from the block's own queries. Each
128-token chunk attends, in one softmax with the sinks and the window, to the top-k blocks its
layer and KV group chose with the *previous* chunk's queries (summed over that chunk and the
group's heads): nothing leaks. Retrieved blocks and sinks sit at position 0 of the chunk's frame
(window at 1..W), so every distance stays inside the trained range. Generation refreshes the
choice per chunk, and once before the prompt's last token with the prompt's last partial chunk.

Settings (`--block key=value` in `python -m memlong_jax.score`): {settings}.

All numbers below: SmolLM2-135M (`/work/main/demo_out/smollm2-135m`), float32, no training, on
the shared 2-core CPU **under heavy load** (load average 14-19 from other jobs): the times are
not speed measurements, only an upper bound on cost, and they are comparable only within a run.
Items per cell are few (the CPU time available allowed one or a few); read accuracies as
examples, not rates.
"""


def load(results: str, pattern: str):
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(results, pattern)))]


def passkey_section(runs) -> list[str]:
    lines = ["## Passkey", "", "| length | row | items | accuracy | s/item | answers |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        for row in run["rows"]:
            answers = [i["answer"].strip().split("\n")[0][:24] for i in run["items"]
                       if i["length"] == row["length"] and i["row"] == row["row"]]
            lines.append(f"| {row['length']} | {row['row']} | {row['items']} | "
                         f"{row['accuracy']:.2f} | {row['seconds_per_item']:.0f} | "
                         f"{'; '.join(repr(a) for a in answers)} |")
    return lines + [""]


def repeat_section(runs) -> list[str]:
    lines = ["## Repeat (copy gain = NLL of the first copy - NLL of the second)", "",
             "| length | row | items | copy gain (nats) | share of the local-full gap closed |"
             " s/item |", "|---|---|---|---|---|---|"]
    for run in runs:
        gains = {(r["length"], r["row"]): r["copy_gain"] for r in run["rows"]}
        for row in run["rows"]:
            local, full = gains.get((row["length"], "local")), gains.get((row["length"], "full"))
            share = ("" if local is None or full is None or full == local
                     else f"{(row['copy_gain'] - local) / (full - local):.0%}")
            lines.append(f"| {row['length']} | {row['row']} | {row['items']} | "
                         f"{row['copy_gain']:.3f} | {share} | {row['seconds_per_item']:.0f} |")
    return lines + [""]


def ppl_section(runs) -> list[str]:
    lines = ["## Perplexity (held-out book, jane_eyre, last 2047 predictions of each window)",
             "", "| length | mode | windows | PPL | ms/token (under load) |", "|---|---|---|---|---|"]
    for run in runs:
        for row in run["rows"]:
            per_token = 1e3 * row["seconds"] / (row["length"] * row["windows"])
            lines.append(f"| {row['length']} | {row['mode']} | {row['windows']} | "
                         f"{row['ppl']:.3f} | {per_token:.1f} |")
    return lines + [""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--out", default=os.path.join(HERE, "..", "docs", "block_memory.md"))
    parser.add_argument("--notes", default=os.path.join(HERE, "block_notes.md"),
                        help="hand-written targets/discussion appended verbatim")
    args = parser.parse_args(argv)
    passkey = load(args.results, "block_passkey*.json")
    repeat = load(args.results, "block_repeat*.json")
    ppl = load(args.results, "block_ppl*.json")
    settings = (passkey or repeat or [{"block": {}}])[0]["block"]
    text = [INTRO.format(settings=", ".join(f"`{k}={v}`" for k, v in settings.items()))]
    text += passkey_section(passkey) + repeat_section(repeat) + ppl_section(ppl)
    if os.path.exists(args.notes):
        text.append(open(args.notes).read())
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(text))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
