"""Convert a memlong-jax checkpoint back to an HF directory (config.json + model.safetensors).

    python -m convert.to_hf CKPT OUT

The result loads with `transformers.LlamaForCausalLM.from_pretrained(OUT)`; tensors are written
in their stored dtype, so from_hf -> to_hf reproduces the original tensors bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from tqdm import tqdm

from memlong_jax.errors import ArgumentParser, atomic_output_dir, entry_point
from memlong_jax.io import checkpoint
from memlong_jax.io.hf_sources import TOKENIZER_FILES, copy_tokenizer_files
from memlong_jax.io.tokenizer import load_tokenizer
from convert.layout import get_path, tensor_slots
from convert.safetensors_writer import write_safetensors
from memlong_jax.io.safe_paths import refuse_overwrite


def export(params, config, out_dir: str, progress: bool = True) -> None:
    """Write `params` (our tree) as HF `model.safetensors` plus `config.json` into `out_dir`."""
    slots = {slot.hf_name: slot for slot in tensor_slots(config)}

    def read(name):
        slot = slots[name]
        array = np.asarray(get_path(params, slot.path))
        return array.T if slot.transpose else array

    entries = []
    for name, slot in slots.items():
        leaf = get_path(params, slot.path)
        shape = tuple(leaf.shape)[::-1] if slot.transpose else tuple(leaf.shape)
        entries.append((name, shape, np.dtype(leaf.dtype)))
    bar = lambda it: tqdm(it, desc="writing", unit="tensor", disable=not progress)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), entries, read, progress=bar)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
        f.write("\n")


def main(argv=None) -> None:
    parser = ArgumentParser(prog="python -m convert.to_hf", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="checkpoint directory written by convert.from_hf")
    parser.add_argument("out", help="output HF directory (must not exist)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    config = checkpoint.load_config(args.ckpt)
    load_tokenizer(args.ckpt)   # a damaged tokenizer.json is refused, not passed on
    refuse_overwrite([args.out], directories=[args.ckpt])
    params = checkpoint.load_params(args.ckpt, config)
    with atomic_output_dir(args.out) as tmp:
        export(params, config, tmp, progress=not args.quiet)
        copy_tokenizer_files(args.ckpt, tmp, [*TOKENIZER_FILES, "chat_template.jinja"])
    if not args.quiet:
        print(f"wrote {args.out}", file=sys.stderr)


cli = entry_point(main)   # the console script

if __name__ == "__main__":
    sys.exit(cli())
