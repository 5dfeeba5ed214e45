"""The command line of `python -m memlong_jax.recall`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time


from memlong_jax.cli.options import (add_model_options, block_settings, load_encoder, load_model,
                                     progress_bars, versions)
from memlong_jax.cli.score import parse_length
from memlong_jax.errors import (ArgumentParser, UserError, check_writable_file, entry_point,
                                write_atomically, write_json)
from memlong_jax.eval.recall import prompts
from memlong_jax.eval.recall.evaluation import (DEFAULT_ROWS, ROW_KINDS, Settings, evaluate,
                                                table, write_csv, write_plot)
from memlong_jax.io.documents import read_documents
from memlong_jax.memlong.config import QUERY_MODES

# The repository's sibling ../shared/data/pg19_like (this file is memlong_jax/cli/recall.py).
DEFAULT_HAYSTACK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                                "shared", "data", "pg19_like")
PLOT_FORMATS = (".png", ".pdf", ".svg")
DEFAULTS = Settings()
DESCRIPTION = """Recall beyond the local window: passkey, needle and repeat in memlong, local,
full and block rows on the same items.
"""


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))


def parse_depths(text: str) -> tuple[float, ...]:
    """`0,50,100` (percent) -> (0.0, 0.5, 1.0)."""
    try:
        return tuple(dict.fromkeys(float(v.strip().rstrip("%")) / 100 for v in _names(text)))
    except ValueError:
        raise UserError(f"--depths needs comma-separated percentages, got {text!r}") from None


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m memlong_jax.recall", description=DESCRIPTION + """
Tasks: passkey (landmark attention's pass key in filler text), needle (a fact in real text),
repeat (a passage of real text that comes back at the end: copy gain). Rows, on the same items:
memlong (one row per query mode), local (the last local window alone), full (plain attention
over everything, up to the model's trained context), block (training-free block memory over
each layer's own K/V, settings via --block; not in the default rows).

With --json the file is rewritten after every cell, so a run that is stopped keeps what it
measured ("complete": false until the end).""",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="converted checkpoint (python -m convert.from_hf)")
    parser.add_argument("--tasks", default=",".join(DEFAULTS.tasks),
                        help=f"of {', '.join(prompts.TASKS)} (default: %(default)s)")
    parser.add_argument("--lengths", default="2k,8k,32k",
                        help="total tokens per item, 2k..1M (default: %(default)s)")
    parser.add_argument("--depths", default="0,50,100",
                        help="depths of the key/needle, percent (default: %(default)s)")
    parser.add_argument("--items", type=int, default=DEFAULTS.items,
                        help="items per (task, length, depth) (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=DEFAULTS.batch,
                        help="items run together; memory grows with it (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="(default: %(default)s)")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                        help=f"rows to compare, of {', '.join(ROW_KINDS)} "
                             "(default: %(default)s)")
    parser.add_argument("--query-modes", default=None,
                        help="memlong query modes, one row each (default: every allowed mode, "
                             f"today {','.join(QUERY_MODES)}; a --set query_mode=X "
                             "alone means just X)")
    parser.add_argument("--local-window", default=str(DEFAULTS.local_window),
                        help="local window of memlong and local rows (default: %(default)s)")
    parser.add_argument("--passage", type=int, default=DEFAULTS.passage,
                        help="repeat: passage tokens (default: %(default)s)")
    parser.add_argument("--max-context", type=int, default=None,
                        help="longest `full` input (default: the model's max positions)")
    parser.add_argument("--haystack", nargs="+", default=[DEFAULT_HAYSTACK],
                        help="needle/repeat text: files or directories "
                             "(default: ../shared/data/pg19_like)")
    add_model_options(parser, block_use="of the block row")
    parser.add_argument("--json", help="write config, per-item records and the summary here")
    parser.add_argument("--csv", help="write one line per (task, row, length, depth) here")
    parser.add_argument("--plot", help=f"heatmaps ({', '.join(PLOT_FORMATS)})")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def settings_from(args) -> Settings:
    if args.query_modes is not None:
        modes = _names(args.query_modes)
    else:
        given = [s.partition("=")[2].strip() for s in args.overrides
                 if s.partition("=")[0].strip() == "query_mode"]
        modes = tuple(given) or None
    if args.max_context is not None and args.max_context < 1:
        raise UserError("--max-context must be at least 1")
    return Settings(tasks=_names(args.tasks),
                    lengths=tuple(sorted({parse_length(x) for x in _names(args.lengths)})),
                    depths=parse_depths(args.depths), items=args.items, batch=args.batch, seed=args.seed,
                    rows=_names(args.rows), query_modes=modes,
                    local_window=parse_length(args.local_window), passage=args.passage,
                    max_context=args.max_context,
                    block=block_settings(args))


def git_commit() -> dict:
    """HEAD of the code that ran and whether it had uncommitted changes."""
    def git(*command):
        try:
            return subprocess.run(["git", *command], cwd=os.path.dirname(__file__),
                                  capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    for path in filter(None, (args.json, args.csv, args.plot)):
        check_writable_file(path)
    if args.plot and not args.plot.lower().endswith(PLOT_FORMATS):
        raise UserError(f"--plot {args.plot}: use a {', '.join(PLOT_FORMATS)} file name")
    needs_text = any(t in settings.tasks for t in ("needle", "repeat"))
    texts = [d.text for d in read_documents(args.haystack)] if needs_text else []
    started, git = time.perf_counter(), git_commit()

    model, mcfg = load_model(args)
    settings.validate(mcfg.chunk_size)      # before the encoder loads
    encoder = load_encoder(mcfg, args.encoder) if "memlong" in settings.rows else None

    def save(results, complete: bool) -> None:
        results["config"] = {
            "checkpoint": os.path.basename(os.path.normpath(args.checkpoint)),
            "checkpoint_path": os.path.abspath(args.checkpoint),
            "settings": dataclasses.asdict(settings), "rows": results["rows"],
            "haystack": [os.path.abspath(p) for p in args.haystack] if needs_text else None,
            "max_context": results["max_context"], "dtype": args.dtype,
            "memlong": results["memlong"], "model": model.config.to_hf_dict(),
            "encoder": args.encoder or ("default" if encoder else None),
            "command": " ".join(["python -m memlong_jax.recall", *(argv or sys.argv[1:])]),
            "versions": versions(), "git": git, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "total_seconds": time.perf_counter() - started, "complete": complete,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        }
        if args.json:
            write_json(args.json, {key: results[key]
                                   for key in ("config", "summary", "records", "timing")})

    with progress_bars("cell", args.quiet) as progress:
        results = evaluate(model, settings, mcfg, encoder, texts, progress,
                           on_cell=lambda partial: save(partial, complete=False))
    save(results, complete=True)
    print(table(results))
    print(f"\n{results['config']['total_seconds']:.0f} s in all (model loading and compilation "
          f"included)")
    if args.csv:
        write_atomically(args.csv, lambda tmp: write_csv(results, tmp))
    if args.plot:
        write_atomically(args.plot, lambda tmp: write_plot(results, tmp))


cli = entry_point(main)   # the console script
