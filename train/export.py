"""Export a trained run: LoRA merged into the base weights, written in our converted-checkpoint
format (so `memlong_jax.load` and `python -m convert.to_hf` read it), optionally also as HF; or
only the trained parameters, as a small adapter directory that merges later.

    python -m train.export OUTPUT_DIR EXPORT_DIR [--hf HF_DIR] [--step N]
    python -m train.export OUTPUT_DIR ADAPTER_DIR --adapter     # trained parameters only
    python -m train.export ADAPTER_DIR EXPORT_DIR [--base DIR]  # merge an adapter

OUTPUT_DIR is a `train.run` output directory; the newest checkpoint (or --step) is used, with
the base weights named by its resolved config (`init_from`, or the seeded random init; `--base`
overrides). An adapter (the LoRA factors and trained norms, megabytes rather than the model's
size) is how a run trained on one machine travels to another that has the base weights.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

from memlong_jax.errors import UserError, atomic_output_dir, entry_point
from memlong_jax.io import checkpoint
from memlong_jax.io.hf_sources import TOKENIZER_FILES, copy_tokenizer_files
from memlong_jax.io.safe_paths import refuse_overwrite
from memlong_jax.llama.config import LlamaConfig
from convert.to_hf import main as to_hf
from train import config as cfgmod
from train import adapter, lora, resume, setup
from train.checkpointing import Checkpoints


def write_model(out_dir: str, model_cfg, mcfg, params, tokenizer_from: str = "",
                hf_dir: str = "") -> None:
    """Write `params` (a full, merged tree) to `out_dir` (must not exist), and to `hf_dir`."""
    with atomic_output_dir(out_dir) as tmp:
        checkpoint.write_config(tmp, model_cfg, memlong=mcfg.to_dict())
        checkpoint.save_params(tmp, params)
        if tokenizer_from:
            copy_tokenizer_files(tokenizer_from, tmp, [*TOKENIZER_FILES, "chat_template.jinja"])
    if hf_dir:
        to_hf([out_dir, hf_dir, "--quiet"])


def export_merged(frozen, trainable, run, model_cfg, base_dtypes, out_dir: str,
                  hf_dir: str = "") -> None:
    t = run.train
    params = lora.merged_for_export(frozen, trainable, t.lora_alpha / t.lora_rank, base_dtypes)
    write_model(out_dir, model_cfg, run.memlong, params, t.init_from, hf_dir)


def trained_from_checkpoint(run_dir: str, step: int | None = None):
    """(stored config, step, trainable tree as numpy) of a run's newest checkpoint (or `step`)."""
    ckpt = Checkpoints(os.path.join(run_dir, "checkpoints"), 1000, False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise UserError(f"{run_dir} holds no training checkpoints")
    try:
        _, stored = ckpt.read_json(step)
        restored = ckpt.restore_state(step, None)
    except Exception as err:  # a damaged checkpoint: name it, another may be chosen
        raise UserError(f"checkpoint {step} in {run_dir} does not restore "
                        f"({resume.reason(err)}); choose another with --step") from None
    finally:
        ckpt.close()
    return stored, step, jax.tree_util.tree_map(np.asarray, restored["train"]["trainable"])


def export_run(source: str, out: str, hf_dir: str = "", step: int | None = None,
               adapter_only: bool = False, base: str = "") -> None:
    """Merge a run's checkpoint (newest, or `step`) or an exported adapter into its base model
    (`base` overrides the recorded `init_from`) and write it out; or, with `adapter_only`, write
    just the trained parameters."""
    from_adapter = adapter.is_adapter(source)
    refuse_overwrite([out, hf_dir], directories=[
        source if from_adapter else os.path.join(source, "checkpoints"), base])
    if from_adapter:
        stored, step, trained = adapter.read(source)
    else:
        stored, step, trained = trained_from_checkpoint(source, step)
    if adapter_only:
        adapter.write(out, stored, step, trained)
        return
    run = setup.resolved_from_dict(stored["run"])
    if base:
        run = cfgmod.Resolved(run.name, run.train.replace(init_from=base), run.memlong)
    model = LlamaConfig.from_hf_dict(stored["model"])
    params = setup.load_base(run, model)
    dtypes = setup.base_dtypes(params)
    frozen, trainable = setup.split_params(run, model, params)
    if jax.tree_util.tree_structure(trained) != jax.tree_util.tree_structure(trainable):
        raise UserError(f"{source} (step {step}) does not match its config's trainable "
                        "parameters")
    export_merged(jax.device_get(frozen), trained, run, model, dtypes, out, hf_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="train.run output directory, or an adapter directory")
    parser.add_argument("out", help="export directory (must not exist)")
    parser.add_argument("--hf", default="", help="also write an HF directory here")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    parser.add_argument("--adapter", action="store_true",
                        help="write only the trained parameters (an adapter directory)")
    parser.add_argument("--base", default="",
                        help="base model directory (default: the run's init_from)")
    args = parser.parse_args(argv)
    if not adapter.is_adapter(args.source) and \
            not os.path.isdir(os.path.join(args.source, "checkpoints")):
        raise UserError(f"{args.source} is neither a training run (no checkpoints/) nor an "
                        "adapter directory")
    if args.adapter and args.hf:
        raise UserError("--hf needs a merged export; drop --adapter")
    export_run(args.source, args.out, args.hf, args.step, args.adapter, args.base)


cli = entry_point(main)   # the console script

if __name__ == "__main__":
    sys.exit(cli())
