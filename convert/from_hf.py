"""Convert an HF LLaMA checkpoint (directory or .gguf) into a memlong-jax checkpoint.

    python -m convert.from_hf SRC OUT [--dtype auto|float32|bfloat16|float16]

SRC: an HF model directory (config.json plus model.safetensors, sharded safetensors with an
index, pytorch_model.bin or sharded .bin) or a llama.cpp .gguf file. OUT: a new directory with
config.json, params/ (orbax) and the tokenizer files. Tensors stream one at a time; every name
and shape is checked against the model before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import ml_dtypes
import numpy as np
from tqdm import tqdm

from memlong_jax.errors import ArgumentParser, UserError, atomic_output_dir, entry_point
from memlong_jax.io import checkpoint
from memlong_jax.io.hf_sources import open_source
from memlong_jax.io.safe_paths import refuse_overwrite
from memlong_jax.llama.config import DTYPES, LlamaConfig
from convert.layout import get_path, set_path, tensor_slots


def _name_list(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")


def validate(config: LlamaConfig, source) -> None:
    """Check every name and shape before any data is read: missing, unused or mis-shaped tensors
    are errors that name them; a copy of the head that equals the tied embedding is allowed."""
    slots = tensor_slots(config)
    expected = {slot.hf_name for slot in slots}
    present = set(source.names())
    missing, unused = expected - present, present - expected
    if config.tie_word_embeddings and "lm_head.weight" in unused:
        if np.array_equal(source.read("lm_head.weight"), source.read("model.embed_tokens.weight")):
            unused.discard("lm_head.weight")
    if missing:
        raise UserError(f"checkpoint lacks tensors the config needs: {_name_list(missing)}")
    if unused:
        raise UserError(f"checkpoint has tensors this LLaMA config does not use: "
                        f"{_name_list(unused)}")
    abstract = checkpoint.abstract_params(config)
    for slot in slots:
        want = tuple(get_path(abstract, slot.path).shape)
        want = want[::-1] if slot.transpose else want
        if source.shape(slot.hf_name) != want:
            raise UserError(f"tensor {slot.hf_name} has shape {source.shape(slot.hf_name)} but "
                            f"the config expects {want}")


def convert(source, config: LlamaConfig, dtype: str = "auto", progress: bool = True) -> dict:
    """Validate, then read and lay out every tensor; returns the params tree (numpy arrays)."""
    validate(config, source)
    params: dict = {}
    for slot in tqdm(tensor_slots(config), desc="converting", unit="tensor", disable=not progress):
        tensor = source.read(slot.hf_name)
        if not np.issubdtype(tensor.dtype, np.floating) and tensor.dtype != ml_dtypes.bfloat16:
            raise UserError(f"tensor {slot.hf_name} has non-float dtype {tensor.dtype}")
        if dtype != "auto":
            tensor = tensor.astype(DTYPES[dtype], copy=False)
        set_path(params, slot.path, np.ascontiguousarray(tensor.T if slot.transpose else tensor))
    return params


def main(argv=None) -> None:
    parser = ArgumentParser(prog="python -m convert.from_hf", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="HF model directory or .gguf file")
    parser.add_argument("out", help="output directory (must not exist)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="stored parameter dtype; auto keeps the source dtype "
                             "(dequantized GGUF tensors are float32)")
    parser.add_argument("--no-tokenizer", action="store_true", help="do not copy the tokenizer")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if os.path.isdir(args.src):
        refuse_overwrite([args.out], directories=[args.src])
    source = open_source(args.src)
    config = LlamaConfig.from_hf_dict(source.hf_config)
    with atomic_output_dir(args.out) as tmp:
        params = convert(source, config, args.dtype, progress=not args.quiet)
        checkpoint.save_params(tmp, params)
        checkpoint.write_config(tmp, config, source=str(args.src), stored_dtype=args.dtype)
        if not args.no_tokenizer:
            source.save_tokenizer(tmp)
    if not args.quiet:
        count = checkpoint.param_count(config)
        print(f"wrote {args.out}: {config.num_hidden_layers} layers, {count:,} parameters "
              f"in {time.perf_counter() - start:.1f}s", file=sys.stderr)


cli = entry_point(main)   # the console script

if __name__ == "__main__":
    sys.exit(cli())
