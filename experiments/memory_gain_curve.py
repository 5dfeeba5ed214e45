"""The memory gain on fixed held-out batches across a training run's checkpoints (issue 15).

The run logs the memory gain (`train.signals`: loss without memory - loss with it) on each
step's own batch, different text every time, so its curve mixes training progress with
batch-to-batch noise. This scores the SAME batches with every point of the run: consecutive
`seq_len` blocks of the run's validation split (never trained on), cut into batches of
`grad_accum` micro-steps as training cuts its steps (memory carried from micro-step to
micro-step, a fresh memory per batch), each batch in several kinds:

  plain                  the blocks as they are;
  recall                 the same blocks with the run's recall mix (`train.recall_mix`) making
                         every episode a recall episode, of a kind drawn from the run's kinds;
  repeat, facts, passkey the same, every episode of that one kind.
The recall seed (--mix-seed) is not the run's, so no statement of training comes back.
A run trained with `memlong.prefix_overlap` is scored with it, as it trained: each micro-step
after a batch's first has the last chunks of the (mixed) block before it in front.

Points: step 0 is what the run started from: the base model (the run's fresh split: LoRA B = 0,
norms as loaded), or its `init_adapter`'s trained parameters; other
`--steps` are checkpoints of RUN_DIR, and each `--adapter` (train.export's adapter directory)
counts at the step it records. One JSON row per (point, kind), written after each row.

    python -m experiments.memory_gain_curve RUN_DIR --steps 0,50,55,60 --adapter ADAPTER_DIR \\
        [--base BASE_MODEL_DIR] [--batches 4] [--kinds plain,repeat,facts,passkey] \\
        [--full] [--read top_k=24]

`--full` adds plain causal attention over each batch's blocks (what the model's own context
makes of the text memory holds) and `--read` changes how memory is read for scoring only:
together they tell what bounds a gain that stops growing (docs/results.md, issue 15; the runs'
commands are there).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from bench import common   # run record, atomic JSON
from memlong_jax import settings
from memlong_jax.errors import ArgumentParser, UserError, entry_point
from memlong_jax.llama.config import LlamaConfig
from memlong_jax.memlong import scan
from memlong_jax.memlong.config import MemLongConfig
from train import config as cfgmod
from train import data as datamod
from train import adapter, export, lora, recall_mix, resume, setup, signals, step as stepmod
from train.checkpointing import Checkpoints

KINDS = ("plain", "recall", *recall_mix.KINDS)
DEFAULT_OUT = os.path.join(common.REPO, "experiments", "results", "train15",
                           "memory_gain_curve.json")
# Besides the LoRA settings, what an adapter must share with the run for its numbers to be the
# same model's.
SAME_MODEL = ("seq_len", "grad_accum")


def validation_batches(blocks: datamod.Blocks, grad_accum: int, batches: int) -> np.ndarray:
    """The first `batches x grad_accum` validation blocks as `[batches, grad_accum, seq_len]`:
    batch b, micro-step i is validation block b * grad_accum + i."""
    tokens = blocks.validation_tokens()
    need = batches * grad_accum * blocks.seq_len
    if len(tokens) < need:
        raise UserError(f"the validation split holds {len(tokens) // blocks.seq_len} blocks, "
                        f"fewer than {batches} batches x {grad_accum} micro-steps")
    return tokens[:need].astype(np.int32).reshape(batches, grad_accum, blocks.seq_len)


def with_recall(batches: np.ndarray, kinds, tokenizer, episode: int, seed: int) -> np.ndarray:
    """`batches` with every episode of `episode` consecutive blocks made a recall episode of one
    of `kinds` (the batches taken as one stream, as training's streams are)."""
    n, grad_accum, seq_len = batches.shape
    if grad_accum % episode:
        raise UserError(f"recall episodes of {episode} blocks would straddle batches of "
                        f"{grad_accum} micro-steps (each batch starts with a fresh memory)")
    mix = recall_mix.RecallMix(tokenizer, seq_len, 1.0, episode, seed, kinds)
    flat = batches.reshape(-1, seq_len)
    mixed = [mix.block(0, micro, lambda i: flat[i]) for micro in range(len(flat))]
    return np.stack(mixed).astype(np.int32).reshape(batches.shape)


def kind_batches(batches: np.ndarray, kinds, run_kinds, tokenizer, episode: int,
                 seed: int) -> dict:
    """{kind: batches of that kind} (`run_kinds`: the recall kinds the `recall` kind mixes)."""
    mixed = {"plain": None, "recall": tuple(run_kinds)}
    return {kind: batches if kind == "plain" else
            with_recall(batches, mixed.get(kind, (kind,)), tokenizer, episode, seed)
            for kind in kinds}


def batch_context(ids: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """`prefix_overlap`'s input for one batch `[grad_accum, seq_len]` run from a fresh memory:
    `Streams.context` of a one-stream run whose data is this batch (context `[grad_accum, 1,
    width]`, has_context `[grad_accum]`: micro-step i > 0 gets the tail of block i - 1, the
    first none)."""
    grad_accum, seq_len = ids.shape
    blocks = datamod.Blocks(ids.reshape(-1), seq_len, 0.0)
    return datamod.Streams(blocks, 1, grad_accum).context(0, width)


def make_full_loss(module, t):
    """`loss(trainable, frozen, ids) -> mean block NLL` of a batch `[grad_accum, seq_len]` read
    with plain causal attention over all its blocks concatenated, each block scored on its own
    predictions as the signal scores it: what the model's own in-context attention makes of the
    text that memory holds (memory reads retrieved chunks of it, this all of it), the yardstick
    for the memory gain."""
    scale = t.lora_alpha / t.lora_rank

    def loss(trainable, frozen, ids):
        logits = module.apply({"params": lora.merge(frozen, trainable, scale)},
                              ids.reshape(1, -1))
        return signals.block_nll(logits.reshape(*ids.shape, -1), ids)

    return loss


class GainScorer:
    """`train.signals.make_signal_step` (the metric the run logs) on one batch at a time, each
    from a fresh memory; jitted once for every point (the trainable trees share a structure).
    `full`: each batch is also read with plain attention over the whole batch (`loss_full`)."""

    def __init__(self, module, mcfg: MemLongConfig, t, frozen, retriever, emb_dim: int | None,
                 full: bool = False):
        self.signal = jax.jit(signals.make_signal_step(module, mcfg, t, with_mass=False))
        self.full_loss = jax.jit(make_full_loss(module, t)) if full else None
        self.frozen, self.retriever = frozen, retriever
        self.empty = scan.init_state(module, mcfg, 1, emb_dim)
        self.context_width = mcfg.prefix_overlap * mcfg.chunk_size

    def batch(self, trainable, ids: np.ndarray) -> dict:
        """Signals of one batch `[grad_accum, seq_len]` (a single stream) as floats."""
        batch = {"ids": ids[:, None]}
        if self.context_width:
            batch["context"], batch["has_context"] = batch_context(ids, self.context_width)
        ids = batch["ids"]
        if self.retriever.host_side:
            batch["key_emb"], batch["query"] = datamod.host_embeddings(self.retriever, ids)
        out = self.signal(trainable, self.frozen, self.empty, batch)
        if self.full_loss is not None:
            out["loss_full"] = self.full_loss(trainable, self.frozen, ids[:, 0])
        return {k: float(v) for k, v in jax.device_get(out).items()}


def summarize(per_batch: list[dict]) -> dict:
    """Means over the batches, and the per-batch gains with their spread; with `loss_full`,
    the full-attention gain (without memory - full attention) beside them."""
    gains = np.array([b["memory_gain"] for b in per_batch])
    full = {}
    if "loss_full" in per_batch[0]:
        full_gains = [b["signal_loss_no_memory"] - b["loss_full"] for b in per_batch]
        full = {"loss_full": float(np.mean([b["loss_full"] for b in per_batch])),
                "full_gain": float(np.mean(full_gains)), "full_gain_per_batch": full_gains}
    return {"batches": len(per_batch),
            "loss_memory": float(np.mean([b["signal_loss"] for b in per_batch])),
            "loss_no_memory": float(np.mean([b["signal_loss_no_memory"] for b in per_batch])),
            "gain": float(gains.mean()),
            "gain_std": float(gains.std(ddof=1)) if len(gains) > 1 else 0.0,
            "gain_min": float(gains.min()), "gain_max": float(gains.max()),
            "gain_per_batch": gains.tolist(), **full}


def score_point(scorer: GainScorer, trainable, batches_by_kind: dict):
    """(kind, summary row) per kind, one at a time, for a point's `trainable` tree."""
    for kind, batches in batches_by_kind.items():
        yield kind, summarize([scorer.batch(trainable, ids) for ids in batches])


# ---- the run and its points -----------------------------------------------------------------

def run_config(run_dir: str):
    """(resolved config, model config, data fingerprint, checkpoint steps) of a run directory."""
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        raise UserError(f"{run_dir}: not a train.run output directory (no checkpoints/)")
    ckpt = Checkpoints(os.path.join(run_dir, "checkpoints"), 1000, False)
    try:
        steps = sorted(ckpt.all_steps())
        if not steps:
            raise UserError(f"{run_dir} holds no training checkpoints")
        cursor, stored = ckpt.read_json(steps[-1])
    finally:
        ckpt.close()
    return (setup.resolved_from_dict(stored["run"]), LlamaConfig.from_hf_dict(stored["model"]),
            cursor.get(resume.FINGERPRINT), steps)


def check_adapter(path: str, stored: dict, run: cfgmod.Resolved) -> None:
    """An adapter of another model (other LoRA settings, other reading) is refused."""
    theirs = setup.resolved_from_dict(stored["run"])
    diffs = adapter.lora_differences(stored, run.train)
    diffs += [k for k in SAME_MODEL if getattr(theirs.train, k) != getattr(run.train, k)]
    if theirs.memlong != run.memlong:
        diffs.append("memlong")
    if diffs:
        raise UserError(f"adapter {path} differs from the run in {', '.join(diffs)}")


def initial_source(run: cfgmod.Resolved) -> str:
    """The label of step 0, what the run started from (the init_adapter as found from here:
    a relative path is the run's own only when run from where the run was)."""
    path = run.train.init_adapter
    if not path:
        return "base model (LoRA zero)"
    _, step, _ = adapter.read(path)
    return f"init_adapter {os.path.abspath(path)} (its step {step})"


def initial_trainable(run: cfgmod.Resolved, model: LlamaConfig, fresh):
    """The trainable tree of step 0: the run's `init_adapter` (checked as training checks it),
    else the fresh split."""
    path = run.train.init_adapter
    return adapter.start_from(path, run.train, model.to_hf_dict(), fresh) if path else fresh


def point_source(step: int, run_dir: str, steps: list[int], adapters: dict,
                 run: cfgmod.Resolved) -> str:
    if step in adapters:
        return f"adapter {adapters[step]}"
    if step == 0:
        return initial_source(run)
    if step not in steps:
        raise UserError(f"step {step}: no checkpoint in {run_dir} (it holds "
                        f"{', '.join(map(str, steps))}) and no --adapter records it")
    return f"checkpoint {step}"


def point_trainable(step: int, run_dir: str, adapters: dict, fresh, initial):
    """The trained tree at `step` (numpy or jax), checked against the run's structure
    (`initial`: step 0's, from `initial_trainable`)."""
    if step in adapters:
        _, _, trained = adapter.read(adapters[step])
    elif step == 0:
        return initial
    else:
        _, _, trained = export.trained_from_checkpoint(run_dir, step)
    if jax.tree_util.tree_structure(trained) != jax.tree_util.tree_structure(fresh):
        raise UserError(f"step {step}: the trained parameters do not match the run's")
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), trained)


# ---- command line ---------------------------------------------------------------------------

def parse_args(argv):
    p = ArgumentParser(prog="python -m experiments.memory_gain_curve", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="train.run output directory (checkpoints/ and their config)")
    p.add_argument("--steps", default="0",
                   help="comma-separated steps: 0 = what the run started from (the base "
                        "model or its init_adapter), others = checkpoints of RUN_DIR (default "
                        "0; --adapter adds its own step)")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="an exported adapter directory, scored at the step it records "
                        "(repeatable)")
    p.add_argument("--base", default="", help="base model directory (default: the run's "
                                              "init_from)")
    p.add_argument("--batches", type=int, default=4, help="batches per kind (default 4)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help=f"comma-separated from {', '.join(KINDS)} (default all)")
    p.add_argument("--mix-seed", type=int, default=1,
                   help="seed of the recall episodes (default 1; the run's seed would repeat "
                        "its statements)")
    p.add_argument("--read", action="append", default=[], metavar="KEY=VALUE",
                   help="a memlong reading setting changed for scoring only (repeatable; e.g. "
                        "top_k=24 retrieves every chunk a 4-block batch writes)")
    p.add_argument("--full", action="store_true",
                   help="also read each batch with plain causal attention over all its blocks "
                        "(loss_full, full_gain): the in-context reference for the gain")
    p.add_argument("--cache-dir", default="out/token_cache",
                   help="token cache directory (default out/token_cache)")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON result file (default "
                   f"{os.path.relpath(DEFAULT_OUT, common.REPO)})")
    args = p.parse_args(argv)
    try:
        args.step_list = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    except ValueError:
        raise UserError(f"--steps {args.steps!r}: expected comma-separated integers") from None
    args.kind_list = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in args.kind_list if k not in KINDS]
    if bad or not args.kind_list:
        raise UserError(f"--kinds: {', '.join(bad) or 'none given'}; choose from "
                        f"{', '.join(KINDS)}")
    if args.batches < 1:
        raise UserError(f"--batches must be at least 1, got {args.batches}")
    if any(s < 0 for s in args.step_list):
        raise UserError("--steps must be >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    started, git = time.perf_counter(), common.git_commit()
    run, model, fingerprint, ckpt_steps = run_config(args.run_dir)
    t = run.train
    if args.base:
        t = t.replace(init_from=args.base)
        run = cfgmod.Resolved(run.name, t, run.memlong)
    run = cfgmod.validate(run, model)
    adapters = {}
    for path in args.adapter:
        stored, step, _ = adapter.read(path)
        check_adapter(path, stored, run)
        adapters[step] = path
    if args.read:   # after the adapters' check: they trained with the run's reading
        run = cfgmod.validate(cfgmod.Resolved(
            run.name, t, settings.apply_overrides(run.memlong, args.read)), model)
    steps = sorted(set(args.step_list) | set(adapters))
    sources = {s: point_source(s, args.run_dir, ckpt_steps, adapters, run) for s in steps}

    tokenizer = datamod.load_tokenizer(t.tokenizer, t.init_from, model.vocab_size)
    files = datamod.list_sources(t.data)
    data_print = datamod.fingerprint(files, tokenizer)
    if fingerprint and data_print != fingerprint:
        raise UserError(f"the run's data ({t.data}) changed since it trained (fingerprint "
                        f"{fingerprint[:12]}, now {data_print[:12]}): its validation split "
                        "would not be the held-out one")
    tokens = datamod.token_file(files, tokenizer, args.cache_dir, key=data_print)
    blocks = datamod.Blocks(tokens, t.seq_len, t.val_fraction)
    batches = kind_batches(validation_batches(blocks, t.grad_accum, args.batches),
                           args.kind_list, t.recall_kind_list, tokenizer, t.recall_episode,
                           args.mix_seed)

    retriever = setup.make_run_retriever(run, tokenizer)
    base = setup.load_base(run, model)
    frozen, fresh = setup.split_params(run, model, base)
    del base
    initial = initial_trainable(run, model, fresh) if 0 in sources else None
    module = stepmod.make_module(model, t.dtype, "none", t.scan_layers)
    scorer = GainScorer(module, run.memlong, t, frozen, retriever,
                        retriever.embedding_size(model), full=args.full)

    config = {"run_dir": os.path.abspath(args.run_dir), "points": sources, "read": args.read,
              "run": run.to_dict(), "data_fingerprint": data_print,
              "validation_blocks": {"first": blocks.n_train, "used": args.batches * t.grad_accum,
                                    "available": blocks.n_val},
              "batch": {"streams": 1, "grad_accum": t.grad_accum, "seq_len": t.seq_len,
                        "context_tokens": scorer.context_width},
              "recall_episode": t.recall_episode, "mix_seed": args.mix_seed}
    data = common.record("memory_gain_curve", args, config, git=git)
    data["rows"] = []
    bar = tqdm(total=len(steps) * len(batches), unit="row", file=sys.stderr)
    for step in steps:
        trainable = point_trainable(step, args.run_dir, adapters, fresh, initial)
        for kind, row in score_point(scorer, trainable, batches):
            data["rows"].append({"step": step, "source": sources[step], "kind": kind, **row})
            data["wall_s"] = time.perf_counter() - started
            common.write_json(args.out, data)
            bar.set_postfix(step=step, kind=kind, gain=f"{row['gain']:.4f}")
            bar.update(1)
    bar.close()
    print(f"memory_gain_curve: wrote {os.path.relpath(args.out)} ({len(data['rows'])} rows, "
          f"{data['wall_s']:.0f} s)", file=sys.stderr)


cli = entry_point(main)

if __name__ == "__main__":
    sys.exit(cli())
