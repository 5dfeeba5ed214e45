"""Presenting scoring results: the stdout table, CSV rows, the PPL-vs-length plot."""

from __future__ import annotations

import csv

PLOT_FORMATS = (".png", ".pdf", ".svg")

CSV_CONFIG_KEYS = ("checkpoint", "local_window", "scored_tokens", "carry_memory", "chunk_size",
                   "top_k", "memory_tokens", "retriever", "query_mode", "eviction", "backend")


def _lookup(rows, length, mode, key):
    for row in rows:
        if row["length"] == length and row["mode"] == mode:
            return row[key]
    return None


def header(config: dict) -> str:
    """What the numbers below mean: the MemLong settings and the protocol, in two lines."""
    m, p = config["memlong"], config["protocol"]
    layers = ",".join(map(str, m["retrieval_layers"]))
    return (f"{config['checkpoint']}: memory layer {m['memory_layer']}, retrieval layers {layers}, "
            f"tau {m['chunk_size']}, top-{m['top_k']}, {m['retriever']} retriever, "
            f"{m['query_mode']} queries, {m['eviction']} eviction, memory {m['memory_tokens']} "
            f"tokens {'carried across windows' if p['carry_memory'] else 'reset per window'}\n"
            f"local window {p['local_window']}; scored: the last predictions of each window "
            f"(column 'scored'); PPL = exp(mean over windows of window-mean NLL)")


def table(results: dict) -> str:
    """One line per length: windows, scored predictions, then PPL and tokens/s per mode."""
    rows, modes = results["rows"], results["config"]["modes"]
    lengths = sorted({row["length"] for row in rows})
    head = (f"{'length':>8} {'windows':>7} {'scored':>6} | "
            + " ".join(f"{'PPL ' + m:>12}" for m in modes) + " | "
            + " ".join(f"{'tok/s ' + m:>13}" for m in modes))
    lines = [header(results["config"]), "", head, "-" * len(head)]
    for length in lengths:
        first = next(row for row in rows if row["length"] == length)
        ppl = [_lookup(rows, length, m, "ppl") for m in modes]
        speed = [_lookup(rows, length, m, "tokens_per_s") for m in modes]
        lines.append(f"{length:>8} {first['windows']:>7} {first['predictions_per_window']:>6} | "
                     + " ".join(f"{p:>12.4f}" if p is not None else f"{'-':>12}" for p in ppl)
                     + " | "
                     + " ".join(f"{s:>13,.0f}" if s else f"{'-':>13}" for s in speed))
    return "\n".join(lines)


def csv_rows(results: dict) -> tuple[list[str], list[dict]]:
    """Per (length, mode) rows with the settings that decide the numbers in every row."""
    config = results["config"]
    flat = {"checkpoint": config["checkpoint"], **config["protocol"], **config["memlong"]}
    settings = {key: flat[key] for key in CSV_CONFIG_KEYS}
    rows = [{**row, **settings} for row in results["rows"]]
    fields = list(results["rows"][0]) + list(CSV_CONFIG_KEYS)
    return fields, rows


def write_csv(results: dict, path: str) -> None:
    write_rows(path, *csv_rows(results))


def write_rows(path: str, fields, rows) -> None:
    """A CSV file of `rows` (dicts) in the columns `fields`, other keys left out; the CSV
    writer of every evaluation (scoring, ICL, recall)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_plot(results: dict, path: str) -> None:
    """PPL against evaluation length, one line per mode, log2 length axis."""
    import matplotlib   # heavy: only loaded when a plot is asked for
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, config = results["rows"], results["config"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode in config["modes"]:
        points = sorted((row["length"], row["ppl"]) for row in rows if row["mode"] == mode)
        if points:
            ax.plot(*zip(*points), marker="o", label=mode)
    ax.set_xscale("log", base=2)
    lengths = sorted({row["length"] for row in rows})
    ax.set_xticks(lengths, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel(f"perplexity (last {config['protocol']['scored_tokens']} tokens)")
    ax.set_title(f"{config['checkpoint']}: local window {config['protocol']['local_window']}",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
