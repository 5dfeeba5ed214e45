"""Precompute the text retriever's keys for a training corpus, once.

    python -m train.keys OUT.npz --config smollm2-135m --set data=books/ [--float16]
    python -m train.run --config smollm2-135m --set data=books/ --set key_table=OUT.npz

Why: the `text` retriever embeds every chunk of every batch with the sentence encoder on the
host, each epoch again. The keys depend only on the chunk's tokens, so they can be computed
once: the table holds one embedding per distinct `chunk_size`-token chunk of the corpus (the
same `--config`/`--set` as training give the same tokens), and training looks keys up by chunk
content. Training then never loads the encoder (in `causal` query mode), which also lets a run
go to a machine that has no encoder weights. `--float16` halves the file; the keys are then
rounded to float16 (about 3 significant digits) before training reads them back as float32.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from tqdm import tqdm

from memlong_jax.errors import ArgumentParser, entry_point, write_atomically
from memlong_jax.memlong.retrievers import make_retriever
from train import config as cfgmod
from train import data as datamod

ENCODE_BATCH = 512  # chunks per encoder call (its own batching pads within each)


def distinct_chunks(tokens: np.ndarray, tau: int) -> np.ndarray:
    """The distinct `tau`-token chunks of the packed corpus (remainder dropped), `[n, tau]`."""
    chunks = np.asarray(tokens[:len(tokens) // tau * tau], np.uint32).reshape(-1, tau)
    return np.unique(chunks, axis=0)


def main(argv=None) -> None:
    parser = ArgumentParser(prog="python -m train.keys", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="table to write (.npz)")
    parser.add_argument("--config", required=True, choices=list(cfgmod.PRESETS))
    parser.add_argument("--set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="the training run's settings (data, tokenizer, encoder_dir, ...)")
    parser.add_argument("--float16", action="store_true", help="store the keys as float16")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    run = cfgmod.resolve(args.config, [item for group in args.set for item in group])
    model = cfgmod.model_config(run)
    run = cfgmod.validate(run, model)
    t, tau = run.train, run.memlong.chunk_size
    if not args.out.endswith(".npz"):
        parser.error("OUT must end in .npz")
    if not make_retriever(run.memlong).host_side:
        parser.error(f"the run's retriever is {run.memlong.retriever!r}: only the text retriever "
                     "has keys to precompute (--set memlong.retriever=text)")

    tokenizer = datamod.load_tokenizer(t.tokenizer, t.init_from, model.vocab_size)
    tokens = datamod.token_file(datamod.list_sources(t.data), tokenizer, t.cache_dir)
    chunks = distinct_chunks(tokens, tau)
    retriever = make_retriever(run.memlong, tokenizer, encoder_dir=t.encoder_dir)

    parts = []
    with tqdm(total=len(chunks), unit="chunk", disable=args.quiet, file=sys.stderr) as bar:
        for start in range(0, len(chunks), ENCODE_BATCH):
            batch = chunks[start:start + ENCODE_BATCH]
            keys = retriever.chunk_keys(batch.reshape(1, -1))
            parts.append(keys.reshape(len(batch), -1))
            bar.update(len(batch))
    vectors = np.concatenate(parts).astype(np.float16 if args.float16 else np.float32)
    meta = {"tau": tau, "tokenizer": tokenizer.identity, "data": t.data,
            "encoder_dir": t.encoder_dir or "bundled all-MiniLM-L6-v2",
            "chunks": len(chunks), "corpus_tokens": len(tokens)}
    write_atomically(args.out, lambda tmp: np.savez(tmp, chunks=chunks.astype(
        np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32), vectors=vectors,
        meta=json.dumps(meta)))
    print(f"{args.out}: keys of {len(chunks)} distinct {tau}-token chunks "
          f"({len(tokens)} corpus tokens), {vectors.shape[1]}-d {vectors.dtype}")


cli = entry_point(main)   # the console script

if __name__ == "__main__":
    sys.exit(cli())
