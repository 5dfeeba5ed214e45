"""Score long documents with MemLong and its baselines on the same tokens (the paper's protocol).

    python -m memlong_jax.score CKPT [INPUT ...] [--lengths 2k,4k,8k] [--modes memlong,local,full]

INPUT: text files, JSONL files (`.jsonl`/`.json`, one document per line, `--text-field`),
directories of them (recursive), or `-` for stdin (the default when stdin is piped).

Each document is cut into non-overlapping windows of every length; in each window the last
`--scored-tokens` tokens (at most the final local window, minus its first token) are scored in
every mode: `memlong` (prefix through memory, local window with retrieval), `local` (the local
window alone), `full` (plain causal attention over the whole window) and, when asked for,
`block` (training-free block memory over each layer's own K/V, settings via `--block`).
Documents shorter than a length are skipped at that length with a warning; if nothing at all
can be scored, that is an error. PPL = exp(mean over windows of window-mean NLL); token-weighted PPL is in the JSON/CSV.
Memory is reset for every window unless `--carry-memory` (upstream's behaviour).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time


from tqdm import tqdm

from memlong_jax.cli.options import (add_model_options, block_settings, load_encoder, load_model,
                                     versions)
from memlong_jax.errors import (ArgumentParser, UserError, check_writable_file, entry_point,
                                write_atomically, write_json)
from memlong_jax.eval import scoring
from memlong_jax.eval.score_report import PLOT_FORMATS, table, write_csv, write_plot
from memlong_jax.io.documents import expand_paths, read_documents
from memlong_jax.io.safe_paths import refuse_overwrite

SUFFIXES = {"k": 1024, "m": 1024 * 1024}


def parse_length(text: str) -> int:
    """`2048`, `2k` (2048), `1M` (1048576)."""
    text = text.strip().lower()
    scale = SUFFIXES.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    if not (digits.isascii() and digits.isdigit()) or int(digits) == 0:
        raise UserError(f"bad length {text!r}: use a positive number of tokens, e.g. 4096 or 4k")
    return int(digits) * scale


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in scoring.MODES]
    if unknown or not modes:
        raise UserError(f"unknown mode {', '.join(unknown) or repr(text)}; choose from "
                        f"{', '.join(scoring.MODES)}")
    return modes


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m memlong_jax.score", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="converted checkpoint (python -m convert.from_hf)")
    parser.add_argument("inputs", nargs="*", help="files, directories or - (default: stdin)")
    parser.add_argument("--lengths", default="2k,4k,8k,16k,32k",
                        help="evaluation lengths, comma separated (default: %(default)s)")
    parser.add_argument("--modes", default=",".join(scoring.DEFAULT_MODES),
                        help=f"modes to compare, from {', '.join(scoring.MODES)} "
                             "(default: %(default)s)")
    parser.add_argument("--local-window", default="2048",
                        help="local attention window of memlong/local modes (default: 2048)")
    parser.add_argument("--scored-tokens", default="2048",
                        help="score the last N tokens of each window (default: 2048)")
    parser.add_argument("--carry-memory", action="store_true",
                        help="keep memory across windows and documents (upstream's evaluation)")
    parser.add_argument("--min-doc-tokens", type=int, default=0,
                        help="drop shorter documents (upstream: 32767; default: 0)")
    parser.add_argument("--max-windows", type=int, default=None,
                        help="at most N windows per document and length (default: all)")
    parser.add_argument("--join", action="store_true",
                        help="join all documents into one, as upstream does for WikiText")
    parser.add_argument("--text-field", default="text", help="JSONL field (default: text)")
    add_model_options(parser, "query_mode=segment, eviction=fifo_half, top_k=4, "
                              "retriever=hidden", block_use="for the block mode")
    parser.add_argument("--json", help="write config, rows and per-window NLL here")
    parser.add_argument("--csv", help="write one row per (length, mode) here")
    parser.add_argument("--plot", help=f"PPL-vs-length plot ({', '.join(PLOT_FORMATS)})")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def check_outputs(args, inputs) -> None:
    outputs = (args.json, args.csv, args.plot)
    for path in filter(None, outputs):
        check_writable_file(path)
    refuse_overwrite(outputs, expand_paths([p for p in inputs if p != "-"]), [args.checkpoint])
    if args.plot and not args.plot.lower().endswith(PLOT_FORMATS):
        raise UserError(f"--plot {args.plot}: use a {', '.join(PLOT_FORMATS)} file name")


def make_protocol(args, chunk_size: int) -> scoring.Protocol:
    if args.min_doc_tokens < 0:
        raise UserError("--min-doc-tokens must not be negative")
    return scoring.Protocol(
        lengths=tuple(sorted({parse_length(x) for x in args.lengths.split(",") if x.strip()})),
        local_window=parse_length(args.local_window),
        scored_tokens=parse_length(args.scored_tokens),
        carry_memory=args.carry_memory, min_doc_tokens=args.min_doc_tokens,
        max_windows=args.max_windows).validate(chunk_size)


def tokenize(model, documents, join: bool):
    if join and len(documents) > 1:
        documents = [(f"joined({len(documents)} documents)",
                      "\n\n".join(doc.text for doc in documents))]
    return [(name, model.encode(text)) for name, text in documents]


def main(argv=None) -> None:
    args = build_parser().parse_intermixed_args(argv)
    modes = parse_modes(args.modes)
    inputs = args.inputs or ["-"]
    check_outputs(args, inputs)
    if inputs == ["-"] and sys.stdin.isatty():
        raise UserError("no input: give files or directories, or pipe text on stdin")

    model, mcfg = load_model(args)
    protocol = make_protocol(args, mcfg.chunk_size)
    block = block_settings(args).validate(model.config) if "block" in modes else None
    documents = tokenize(model, read_documents(inputs, args.text_field), args.join)

    warnings = []
    plan = [(length, len(protocol.window_starts(len(ids), length)))
            for length in protocol.lengths for _, ids in documents]
    total = sum(length * n for length, n in plan) * len(modes)
    if not total:
        shortest = min(len(ids) for _, ids in documents)
        raise UserError(f"nothing to score: the longest document has "
                        f"{max(len(ids) for _, ids in documents)} tokens (shortest {shortest}), "
                        f"less than the smallest length {protocol.lengths[0]}"
                        + (f" or the minimum {protocol.min_doc_tokens}"
                           if protocol.min_doc_tokens else ""))

    encoder = load_encoder(mcfg, args.encoder) if "memlong" in modes else None
    scorer = scoring.Scorer(model.module, model.params, mcfg, protocol,
                            model.retriever(mcfg, encoder), block)

    bar = tqdm(total=total, unit="tok", unit_scale=True, disable=args.quiet, file=sys.stderr,
               dynamic_ncols=True)

    start = time.perf_counter()
    with bar:
        results = scoring.evaluate(scorer, documents, modes, bar, warnings.append)
    results["config"] = {
        "checkpoint": os.path.basename(os.path.normpath(args.checkpoint)),
        "checkpoint_path": os.path.abspath(args.checkpoint),
        "modes": list(modes), "dtype": args.dtype,
        "protocol": dataclasses.asdict(protocol), "memlong": mcfg.to_dict(),
        "block": dataclasses.asdict(block) if block else None,
        "model": model.config.to_hf_dict(),
        "encoder": args.encoder or ("default" if encoder else None),
        "inputs": inputs, "join": args.join,
        "documents": [{"name": name, "tokens": int(len(ids))} for name, ids in documents],
        "versions": versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "total_seconds": time.perf_counter() - start,
    }
    for message in warnings:
        print(f"warning: {message}", file=sys.stderr)
    print(table(results))
    if args.json:
        write_json(args.json, {key: results[key] for key in ("config", "rows", "windows")})
    if args.csv:
        write_atomically(args.csv, lambda tmp: write_csv(results, tmp))
    if args.plot:
        write_atomically(args.plot, lambda tmp: write_plot(results, tmp))


cli = entry_point(main)   # the console script

if __name__ == "__main__":
    sys.exit(cli())
