"""The command line of `python -m memlong_jax.icl`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time


from memlong_jax.cli.options import (add_model_options, load_encoder, load_model, progress_bars,
                                     versions)
from memlong_jax.errors import (ArgumentParser, UserError, check_writable_file, entry_point,
                                write_atomically, write_json)
from memlong_jax.eval.icl.evaluation import evaluate, table, write_csv
from memlong_jax.eval.icl.prompts import Settings
from memlong_jax.eval.icl.tasks import DEFAULT_DATA, ROWS, TASKS, get_task, load_split
from memlong_jax.io.safe_paths import refuse_overwrite



def parse_ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
        if name == "seeds" and any(not 0 <= v < 2**32 for v in values):
            raise ValueError
    except ValueError:
        raise UserError(f"--{name} needs comma-separated integers, got {text!r}") from None
    return tuple(dict.fromkeys(values))


def parse_names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m memlong_jax.icl", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="converted checkpoint (python -m convert.from_hf)")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help="tasks, comma separated (default: %(default)s)")
    parser.add_argument("--k", default="4,20", help="in-context demonstrations (default: 4,20)")
    parser.add_argument("--m", default="18,38",
                        help="memory demonstrations, each with every k (default: 18,38)")
    parser.add_argument("--seeds", default="1,2,3", help="seeds (default: 1,2,3)")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help="rows to compare (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None,
                        help="score a fixed random N test items per task (default: all)")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="ICL data directory (default: ../shared/data/icl)")
    parser.add_argument("--max-context", type=int, default=None,
                        help="longest `full` input (default: the model's max positions)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="items per batch (default: 8)")
    parser.add_argument("--batch-tokens", type=int, default=8192,
                        help="at most this many window tokens per batch (default: 8192)")
    add_model_options(parser)
    parser.add_argument("--json", help="write config, per-seed runs and the summary here")
    parser.add_argument("--csv", help="write one row per (task, row, k, m) here")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    settings = Settings(tasks=parse_names(args.tasks), ks=parse_ints(args.k, "k"),
                        ms=parse_ints(args.m, "m"), seeds=parse_ints(args.seeds, "seeds"),
                        rows=parse_names(args.rows), limit=args.limit).validate()
    if args.batch_size < 1 or args.batch_tokens < 1:
        raise UserError("--batch-size and --batch-tokens must be at least 1")
    if args.max_context is not None and args.max_context < 1:
        raise UserError("--max-context must be at least 1")
    for path in filter(None, (args.json, args.csv)):
        check_writable_file(path)
    refuse_overwrite((args.json, args.csv), directories=[args.checkpoint, args.data])
    if not os.path.isdir(args.data):
        raise UserError(f"{args.data}: no such ICL data directory (see --data)")
    for name in settings.tasks:   # fail on data before loading the model
        load_split(args.data, get_task(name), "train")
        load_split(args.data, get_task(name), "test")

    model, mcfg = load_model(args)
    encoder = load_encoder(mcfg, args.encoder)

    start = time.perf_counter()
    with progress_bars("item", args.quiet) as progress:
        results = evaluate(model, args.data, settings, mcfg, encoder, args.batch_size,
                           args.batch_tokens, args.max_context, progress)
    results["config"] = {
        "checkpoint": os.path.basename(os.path.normpath(args.checkpoint)),
        "checkpoint_path": os.path.abspath(args.checkpoint),
        "data": os.path.abspath(args.data), **dataclasses.asdict(settings),
        "max_context": args.max_context or model.config.max_position_embeddings,
        "batch_size": args.batch_size, "batch_tokens": args.batch_tokens, "dtype": args.dtype,
        "memlong": results.pop("memlong"), "model": model.config.to_hf_dict(),
        "encoder": args.encoder or ("default" if encoder else None),
        "versions": versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "total_seconds": time.perf_counter() - start,
    }
    items = ", ".join(f"{t} {len(i)}" for t, i in results["items"].items())
    seeds = ",".join(map(str, settings.seeds))
    print(f"label-word accuracy (%), mean ± std over seeds {seeds}; items: {items}")
    print(table(results, "accuracy"))
    print("\nupstream's argmax-next-token accuracy (%)")
    print(table(results, "argmax_accuracy"))
    timing = results["timing"]
    print(f"\n{results['config']['total_seconds']:.0f} s in all, scoring "
          f"{timing['seconds'] - timing['compile_seconds']:.0f} s, compiling "
          f"{timing['compile_seconds']:.0f} s")
    if args.json:
        write_json(args.json, {key: results[key]
                               for key in ("config", "summary", "runs", "items", "timing")})
    if args.csv:
        write_atomically(args.csv, lambda tmp: write_csv(results, tmp))


cli = entry_point(main)   # the console script

if __name__ == "__main__":
    sys.exit(cli())
