"""`make demo`: perplexity of a converted checkpoint on real text, next to transformers/torch.

    python -m memlong_jax.demo CKPT [--hf-source SRC] [--tokens N]

CKPT is a directory written by `python -m convert.from_hf`; SRC is what it was converted from
(an HF directory or a .gguf file), loaded by transformers for the reference number.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import memlong_jax as ml
from memlong_jax.errors import UserError, entry_point
from memlong_jax.io.documents import pydoc_text


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean next-token NLL), computed in float64 from `[1, T, V]` logits."""
    logits = logits[0, :-1].astype(np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(logp)), ids[0, 1:]].mean()))


def torch_perplexity(source: str, ids: np.ndarray) -> float:
    import torch   # heavy and optional: only for the reference number
    from transformers import AutoModelForCausalLM   # likewise (it needs torch)
    if source.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(source), gguf_file=os.path.basename(source), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        logits = model.eval()(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    return perplexity(logits, ids)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m memlong_jax.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="converted checkpoint directory")
    parser.add_argument("--hf-source", help="the original checkpoint, scored by transformers too")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of text to score")
    args = parser.parse_args(argv)
    if args.tokens < 2:
        raise UserError("--tokens must be at least 2")

    model = ml.load(args.ckpt)
    ids = model.encode(pydoc_text())[: args.tokens][None]
    start = time.perf_counter()
    ppl = perplexity(np.asarray(model.logits(ids)), ids)
    print(f"pydoc_data.topics, first {ids.shape[1]} tokens")
    print(f"  memlong-jax (JAX, fp32)        perplexity {ppl:.4f}   "
          f"({time.perf_counter() - start:.1f}s incl. compile)")
    if args.hf_source:
        start = time.perf_counter()
        reference = torch_perplexity(args.hf_source, ids)
        print(f"  transformers (torch, fp32)     perplexity {reference:.4f}   "
              f"({time.perf_counter() - start:.1f}s incl. load)")
        print(f"  relative difference            {abs(ppl - reference) / reference:.2e}")


cli = entry_point(main)   # the console script

if __name__ == "__main__":
    sys.exit(cli())
