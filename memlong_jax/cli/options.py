"""Command-line pieces shared by the commands that run a checkpoint (score, generate, icl)."""

from __future__ import annotations

import contextlib
import platform
import sys

import flax
import jax
import numpy as np
from tqdm import tqdm

import memlong_jax as ml
from memlong_jax.errors import UserError
from memlong_jax.memlong.blockmem import BlockConfig
from memlong_jax.memlong.config import MemLongConfig
from memlong_jax.memlong.retrievers import make_retriever
from memlong_jax.settings import apply_overrides, describe


def add_model_options(parser, set_examples: str = "query_mode=segment, retriever=hidden, "
                                                  "top_k=4", block_use: str = "") -> None:
    """--set (MemLong overrides), --encoder (text retriever), --dtype and, with `block_use`,
    --block (block memory overrides); the keys, their help and allowed values (from the config
    fields' metadata) go into the epilog."""
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help=f"MemLong setting, e.g. {set_examples} (repeatable; keys below)")
    epilog = ["MemLong settings (--set KEY=VALUE; defaults: the checkpoint's own):",
              *describe(MemLongConfig)]
    if block_use:
        parser.add_argument("--block", dest="block_overrides", action="append", default=[],
                            metavar="KEY=VALUE",
                            help=f"block memory setting {block_use}, e.g. window=1024, top_k=16 "
                                 "(repeatable; keys below)")
        epilog += ["block memory settings (--block KEY=VALUE; defaults shown):",
                   *describe([BlockConfig()])]
    parser.epilog = "\n".join(filter(None, [parser.epilog, *epilog]))
    parser.add_argument("--encoder", default=None,
                        help="text retriever directory (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (default: float32)")


def load_model(args):
    """(model, MemLong settings) for `args.checkpoint`: the checkpoint's own settings (or the
    defaults for its shape) with `--set` applied; a tokenizer is required."""
    model = ml.load(args.checkpoint, args.dtype)
    if model.tokenizer is None:
        raise UserError(f"{args.checkpoint} has no tokenizer; convert it with its tokenizer")
    return model, apply_overrides(model.memlong_config, args.overrides).validate(model.config)


def block_settings(args) -> BlockConfig:
    """The block memory settings with `--block` applied (keys named `block.KEY` in errors)."""
    return apply_overrides({"block": BlockConfig()},
                           [f"block.{item}" for item in args.block_overrides])["block"]


def load_encoder(mcfg, encoder_dir: str | None):
    """The text retriever's encoder when the settings use one, else None; loaded now, so that
    a bad directory fails before any work and loading is not timed as scoring."""
    return make_retriever(mcfg, encoder_dir=encoder_dir).encoder


def versions() -> dict:
    """What a results file records about the software and machine that produced it."""
    return {"python": platform.python_version(), "jax": jax.__version__,
            "flax": flax.__version__, "numpy": np.__version__,
            "device": str(jax.devices()[0].device_kind), "machine": platform.machine()}


@contextlib.contextmanager
def progress_bars(unit: str, quiet: bool):
    """A factory `progress(total)` of tqdm bars on stderr; every bar it made is closed on exit."""
    bars = []

    def progress(total):
        bars.append(tqdm(total=total, unit=unit, disable=quiet, file=sys.stderr,
                         dynamic_ncols=True))
        return bars[-1]

    try:
        yield progress
    finally:
        for bar in bars:
            bar.close()
