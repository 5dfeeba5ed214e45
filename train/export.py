"""Export a trained run: LoRA merged into the base weights, written in our converted-checkpoint
format (so `memlong_jax.load` and `python -m convert.to_hf` read it), optionally also as HF.

    python -m train.export OUTPUT_DIR EXPORT_DIR [--hf HF_DIR] [--step N]

OUTPUT_DIR is a `train.run` output directory; the newest checkpoint (or --step) is used, with
the base weights named by its resolved config (`init_from`, or the seeded random init).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from memlong_jax import checkpoint
from memlong_jax.errors import UserError, atomic_output_dir, run_cli
from memlong_jax.hf_sources import TOKENIZER_FILES
from train import lora


def write_model(out_dir: str, model_cfg, mcfg, params, tokenizer_from: str = "",
                hf_dir: str = "") -> None:
    """Write `params` (a full, merged tree) to `out_dir` (must not exist), and to `hf_dir`."""
    with atomic_output_dir(out_dir) as tmp:
        checkpoint.write_config(tmp, model_cfg, memlong=mcfg.to_dict())
        checkpoint.save_params(tmp, params)
        for name in [*TOKENIZER_FILES, "chat_template.jinja"]:
            src = os.path.join(tokenizer_from, name) if tokenizer_from else ""
            if src and os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, name))
    if hf_dir:
        from convert.to_hf import main as to_hf
        to_hf([out_dir, hf_dir, "--quiet"])


def export_merged(frozen, trainable, run, model_cfg, base_dtypes, out_dir: str,
                  hf_dir: str = "") -> None:
    t = run.train
    params = lora.merged_for_export(frozen, trainable, t.lora_alpha / t.lora_rank, base_dtypes)
    write_model(out_dir, model_cfg, run.memlong, params, t.init_from, hf_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="train.run output directory")
    parser.add_argument("out", help="export directory (must not exist)")
    parser.add_argument("--hf", default="", help="also write an HF directory here")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    args = parser.parse_args(argv)
    from train.run import export_run
    if not os.path.isdir(os.path.join(args.run_dir, "checkpoints")):
        raise UserError(f"{args.run_dir} holds no training checkpoints")
    export_run(args.run_dir, args.out, args.hf, args.step)


if __name__ == "__main__":
    sys.exit(run_cli(main))
