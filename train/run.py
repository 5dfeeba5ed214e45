"""Train MemLong with the paper's recipe: frozen lower stack, LoRA (or full) upper layers,
memory carried across steps per replica over contiguous data streams.

    python -m train.run --config tiny
    python -m train.run --config smollm2-135m --set steps=20 --set data=books/
    python -m train.run --config openllama3b --set init_from=ckpt/open_llama_3b_v2
    python -m train.run --config openllama3b --dry-run --set mesh_fsdp=8

The output directory holds checkpoints/ (orbax: resumed automatically when present),
metrics.jsonl and tb/ (TensorBoard). Multi-host: run the same command on every host with
--coordinator HOST:PORT --num-processes N --process-id I (or --coordinator auto under SLURM or on
a TPU pod slice; train/hosts.py, docs/reliability.md); the mesh then spans all hosts' devices.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from memlong_jax import interrupts, settings
from memlong_jax.errors import ArgumentParser, UserError, check_writable_dir
from memlong_jax.io import checkpoint
from memlong_jax.io.safe_paths import refuse_overwrite
from memlong_jax.llama.config import DTYPES, LlamaConfig
from memlong_jax.memlong import scan
from train import config as cfgmod
from train import data as datamod
from train import (adapter, export, hosts, lora, metrics, recall_mix, resume, setup, sharding,
                   signals, step as stepmod)
from train.run_lock import RunLock
from train.checkpointing import Checkpoints, abstract_like, state_to_tree, tree_to_state

# Settings that may change when a run is resumed (they do not change the computation).
OPERATIONAL = {"log_every", "checkpoint_every", "keep_checkpoints", "async_checkpoint",
               "progress", "tensorboard", "peak_tflops", "export_dir", "export_hf",
               "eval_every", "eval_batches", "output_dir", "cache_dir", "init_from",
               "mesh_data", "mesh_fsdp", "encoder_dir", "allow_data_change", "signal_every"}



def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m train.run", description=__doc__,
                     epilog=cfgmod.help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, choices=list(cfgmod.PRESETS),
                        help="preset: " + ", ".join(cfgmod.PRESETS))
    parser.add_argument("--set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a setting (repeatable); keys listed below")
    parser.add_argument("--dry-run", action="store_true",
                        help="print parameter counts, bytes per device and FLOPs per step "
                             "(jax.eval_shape only, nothing allocated) and exit")
    hosts.add_arguments(parser)
    return parser


def check_compatible(stored: dict, run: cfgmod.Resolved, model: LlamaConfig, where: str) -> None:
    mine = {"train": run.train.to_dict(), "memlong": run.memlong.to_dict(),
            "model": model.to_hf_dict(), "preset": run.name}
    theirs = {"train": stored["run"]["train"], "memlong": stored["run"]["memlong"],
              "model": stored["model"], "preset": stored["run"]["preset"]}
    # A setting added after the checkpoint was written counts as its default, which by
    # convention keeps the behaviour from before the setting existed.
    added = {"train": settings.defaults(type(run.train)),
             "memlong": settings.defaults(type(run.memlong)), "model": {}}
    diffs = []
    for part in ("preset", "model", "memlong", "train"):
        a, b = theirs[part], mine[part]
        if not isinstance(a, dict):
            if a != b:
                diffs.append(f"{part}: {a} -> {b}")
            continue
        for key in sorted(set(a) | set(b)):
            if part == "train" and key in OPERATIONAL:
                continue
            old = a[key] if key in a else added[part].get(key)
            if old != b.get(key):
                prefix = "" if part == "train" else f"{part}."
                diffs.append(f"{prefix}{key}: {old!r} -> {b.get(key)!r}")
    if diffs:
        raise UserError(f"{where} holds checkpoints of a different config ({'; '.join(diffs[:4])}"
                        f"{'; ...' if len(diffs) > 4 else ''}); use another output_dir or the "
                        "same settings")


def ensure_writable(path: str) -> None:
    check_writable_dir(path, "output_dir")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to output_dir {path}: {err.strerror or err}") from None


# ---- dry run ------------------------------------------------------------------------------------

def dry_run_report(run: cfgmod.Resolved, model: LlamaConfig) -> str:
    t, m = run.train, run.memlong
    abstract = checkpoint.abstract_params(model, DTYPES[t.param_dtype])
    spec = lora.plan(abstract, model, m, t.trainable, t.lora_target_list, t.train_norms,
                     t.train_from)
    frozen, trainable = jax.eval_shape(
        lambda p: lora.split(p, spec, t.lora_rank, jax.random.PRNGKey(0)), abstract)
    tx, _ = stepmod.make_optimizer(t, max(1, t.steps))
    opt = jax.eval_shape(tx.init, trainable)
    data = 1 if t.mesh_data == -1 else t.mesh_data
    sizes = {"data": data, "fsdp": t.mesh_fsdp}
    try:
        emb_dim = setup.make_run_retriever(run).embedding_size(model)
        emb_note = ""
    except UserError:
        emb_dim, emb_note = 1024, " (text encoder not installed: assumed 1024-d, bge-m3)"
    module = stepmod.make_module(model, t.dtype, "none")
    mem = jax.eval_shape(lambda: scan.init_state(module, m, t.rows_per_replica, emb_dim))

    def per_device(tree, sharded=True):
        return sum(sharding.shard_bytes(x.shape, x.dtype,
                                         sharding.param_spec(x.shape, t.mesh_fsdp) if sharded
                                         else sharding.P(), sizes)
                   for x in jax.tree_util.tree_leaves(tree))

    n_frozen_base = lora.count(abstract) - sum(
        int(np.prod(x.shape)) for p, x in traverse_util.flatten_dict(abstract).items()
        if spec.get(p) == "full")
    flops = metrics.step_flops(model, m, t)
    gib = lambda b: f"{b / 2**30:.3f} GiB"
    replicas = data * t.mesh_fsdp
    lines = [
        f"config {run.name}: {model.num_hidden_layers} layers, hidden {model.hidden_size}, "
        f"vocab {model.vocab_size}; memory layer {m.memory_layer}, retrieval layers "
        f"{list(m.retrieval_layers)}; trainable={t.trainable}",
        f"mesh: data {data} x fsdp {t.mesh_fsdp} = {replicas} device(s), "
        f"{t.rows_per_replica} row(s) x grad_accum {t.grad_accum} x {t.seq_len} tokens per "
        "replica per step",
        f"parameters: trainable {lora.count(trainable):,}  frozen {n_frozen_base:,}  "
        f"(base model {lora.count(abstract):,})",
        f"bytes per device: frozen params {gib(per_device(frozen))} ({t.param_dtype}), "
        f"trainable params {gib(per_device(trainable))}, gradient accumulator "
        f"{gib(per_device(trainable))}, optimizer state {gib(per_device(opt))} (AdamW fp32), "
        f"memory state {gib(per_device(mem, sharded=False))} "
        f"({t.rows_per_replica} row(s) x {m.capacity_chunks} chunks of {m.chunk_size} tokens, "
        f"{m.mem_dtype}){emb_note}",
        f"FLOPs per step per replica: {flops['flops_per_replica_step']:.4e} "
        f"({flops['flops_per_token']:.4e} per token, frozen-aware); global "
        f"{flops['flops_per_replica_step'] * replicas:.4e}",
    ]
    return "\n".join(lines)


# ---- training -----------------------------------------------------------------------------------

class Trainer:
    def __init__(self, run: cfgmod.Resolved, model: LlamaConfig):
        self.run, self.model = run, model
        t, m = run.train, run.memlong
        self.t, self.m = t, m
        self.main = jax.process_index() == 0
        check_writable_dir(t.output_dir, "output_dir")
        # An existing output directory may be another run's: refuse before the slow setup.
        self.lock = RunLock(t.output_dir) if self.main and os.path.isdir(t.output_dir) else None
        try:
            self._build()
        except BaseException:
            self.release()
            raise

    def _build(self) -> None:
        run, model, t, m = self.run, self.model, self.t, self.m
        self.mesh = sharding.make_mesh(t.mesh_data, t.mesh_fsdp)
        self.n_streams = self.mesh.size * t.rows_per_replica
        self.local_rows = sharding.local_rows(self.mesh, self.n_streams)

        # data
        self.tokenizer = datamod.load_tokenizer(t.tokenizer, t.init_from, model.vocab_size)
        files = datamod.list_sources(t.data)
        data_dirs = [p for p in t.data.split(",") if os.path.isdir(p.strip())]
        refuse_overwrite([t.output_dir, t.export_dir, t.export_hf], files,
                         [t.init_from, *data_dirs])
        self.fingerprint = datamod.fingerprint(files, self.tokenizer)
        tokens = datamod.token_file(files, self.tokenizer, t.cache_dir, key=self.fingerprint)
        self.blocks = datamod.Blocks(tokens, t.seq_len, t.val_fraction)
        mix = recall_mix.RecallMix(self.tokenizer, t.seq_len, t.recall_fraction, t.recall_episode,
                                   t.seed, t.recall_kind_list) if t.recall_fraction else None
        self.streams = datamod.Streams(self.blocks, self.n_streams, t.grad_accum, mix,
                                       t.data_start)
        self.total_steps = t.steps or self.streams.steps_per_epoch
        self.ckpt = None
        if os.path.isdir(os.path.join(t.output_dir, "checkpoints")):
            # a resume: other data or another config is refused before the slow setup
            self.ckpt = self._open_checkpoints()
            resume.check_newest(self.ckpt, self._check_resumable)
        self.retriever = setup.make_run_retriever(run, self.tokenizer)
        self.emb_dim = self.retriever.embedding_size(model)

        # model, trainable split, optimizer, memory
        base = setup.load_base(run, model)
        self.base_dtypes = setup.base_dtypes(base)
        frozen, trainable = setup.split_params(run, model, base)
        del base
        if t.init_adapter:
            trainable = adapter.start_from(t.init_adapter, t, model.to_hf_dict(), trainable)
        self.module = stepmod.make_module(model, t.dtype, t.remat, t.scan_layers)
        self.tx, self.schedule = stepmod.make_optimizer(t, self.total_steps)
        state = {"step": jnp.int32(0), "trainable": trainable,
                 "opt_state": self.tx.init(trainable),
                 "rng": jax.random.fold_in(jax.random.PRNGKey(t.seed), 2)}
        mem = scan.init_state(self.module, m, self.n_streams, self.emb_dim)

        rep = sharding.replicated(self.mesh)
        self.frozen_sh = sharding.param_shardings(frozen, self.mesh)
        self.state_sh = {"step": rep, "rng": rep,
                         "trainable": sharding.param_shardings(trainable, self.mesh),
                         "opt_state": sharding.param_shardings(state["opt_state"], self.mesh)}
        self.mem_sh = sharding.memory_shardings(mem, self.mesh)
        self.frozen = jax.device_put(frozen, self.frozen_sh)
        # Donated arguments must not share buffers (init_memory reuses one zeros array).
        fresh = lambda tree: jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)
        state = jax.device_put(fresh(state), self.state_sh)
        mem = jax.device_put(fresh(mem), self.mem_sh)

        # checkpoints: resume when present (a new output directory is created only now)
        ensure_writable(t.output_dir)
        if self.main and self.lock is None:
            self.lock = RunLock(t.output_dir)
        self.state, self.mem, self.start = self._resume(state, mem)

        step_fn = stepmod.make_train_step(self.module, m, t, self.tx, self.schedule)
        self.step_fn = jax.jit(step_fn, donate_argnums=(0, 2),
                               out_shardings=(self.state_sh, self.mem_sh, rep))
        self.flops = metrics.step_flops(model, m, t)
        self.peak = metrics.peak_tflops(jax.devices()[0].device_kind, t.peak_tflops)
        self.log = metrics.MetricsLog(t.output_dir, t.tensorboard, enabled=self.main,
                                      purge_step=self.start + 1 if self.start else None)
        self._eval_fn = self._signal_fn = None
        self.compile_s = None

    def _open_checkpoints(self) -> Checkpoints:
        t = self.t
        return Checkpoints(os.path.join(t.output_dir, "checkpoints"), t.keep_checkpoints,
                           t.async_checkpoint)

    def _check_resumable(self, step: int, cursor: dict, stored: dict) -> None:
        """A `UserError` for a checkpoint of another config or other data."""
        t = self.t
        check_compatible(stored, self.run, self.model, t.output_dir)
        resume.check_data(step, cursor, self.streams.cursor(step), self.fingerprint,
                          t.allow_data_change, t.output_dir)

    def _resume(self, state, mem):
        """(state, memory, step) from the newest checkpoint that restores, else the fresh ones."""
        t = self.t
        self.ckpt = self.ckpt or self._open_checkpoints()
        target = {"train": state, "memory": state_to_tree(mem)}
        target_sh = {"train": self.state_sh, "memory": state_to_tree(self.mem_sh)}
        found = resume.restore_newest(self.ckpt, abstract_like(target, target_sh),
                                      self._check_resumable)
        start = 0
        if found:
            start, _, restored = found
            state, mem = restored["train"], tree_to_state(restored["memory"])
        if self.main:
            resume.drop_metrics_after(t.output_dir, start)
        return state, mem, start

    def release(self) -> None:
        if self.lock:
            self.lock.release()

    # -- batches

    def _global(self, array, axis):
        return sharding.put(array, sharding.rows_sharding(self.mesh, array.ndim, axis))

    def batch(self, step: int) -> dict:
        ids = self.streams.batch(step, self.local_rows)  # zeros in the rows other hosts feed
        out = {"ids": self._global(ids, 1)}
        if self.m.prefix_overlap:
            context, has_context = self.streams.context(
                step, self.m.prefix_overlap * self.m.chunk_size, self.local_rows)
            out["context"] = self._global(context, 1)
            out["has_context"] = sharding.put(has_context, sharding.replicated(self.mesh))
        if self.retriever.host_side:
            out["key_emb"], out["query"] = self._embedded(ids, 1)
        return out

    def _embedded(self, ids: np.ndarray, axis: int, window: int | None = None):
        """The retriever's host-side inputs (key_emb, query; None where made in-graph) as global
        arrays, from this host's rows of `ids` only (`axis`: the row axis, second to last):
        each host embeds the text of the rows its devices hold, zeros stand in for the rest."""
        mine = np.take(ids, self.local_rows, axis=axis)
        return tuple(None if x is None else self._global(self._all_rows(x, axis), axis)
                     for x in datamod.host_embeddings(self.retriever, mine, window))

    def _all_rows(self, local: np.ndarray, axis: int) -> np.ndarray:
        """`local_rows` along `axis` -> all `n_streams` rows, zeros in other hosts' rows."""
        full = np.zeros((*local.shape[:axis], self.n_streams, *local.shape[axis + 1:]),
                        local.dtype)
        index = (slice(None),) * axis + (self.local_rows,)
        full[index] = local
        return full

    def config_json(self) -> dict:
        return {"run": self.run.to_dict(), "model": self.model.to_hf_dict(),
                "layout": {"streams": self.n_streams, "emb_dim": self.emb_dim,
                           "total_steps": self.total_steps}}

    def save(self, step: int) -> None:
        tree = {"train": self.state, "memory": state_to_tree(self.mem)}
        cursor = {**self.streams.cursor(step), resume.FINGERPRINT: self.fingerprint}
        self.ckpt.save(step, tree, cursor, self.config_json())

    # -- validation (the paper's protocol: last `eval_window` tokens of each window)

    def evaluate(self) -> dict | None:
        t = self.t
        if not t.eval_batches:
            return None
        windows = datamod.validation_windows(self.blocks, t.eval_length, self.n_streams,
                                             t.eval_batches)
        if not len(windows):
            return None
        if self._eval_fn is None:
            self._eval_fn = jax.jit(stepmod.make_eval_step(self.module, self.m, t, t.eval_window,
                                                           self.emb_dim))
        total, count = 0.0, 0.0
        for ids in windows:
            key_emb = query = None
            if self.retriever.host_side:
                key_emb, query = self._embedded(ids, 0, t.eval_window)
            s, n = self._eval_fn(self.state["trainable"], self.frozen, self._global(ids, 0),
                                 key_emb, query)
            total, count = total + float(s), count + float(n)
        loss = total / count
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}

    def memory_signals(self, batch) -> dict:
        """`train.signals` on this step's batch before its update (memory gain, mass)."""
        if self._signal_fn is None:
            self._signal_fn = jax.jit(signals.make_signal_step(self.module, self.m, self.t))
        out = self._signal_fn(self.state["trainable"], self.frozen, self.mem, batch)
        return {k: float(v) for k, v in jax.device_get(out).items()}

    # -- loop

    def train(self) -> None:
        """Run to `total_steps`. SIGINT/SIGTERM/SIGHUP end the step in flight, then save a
        checkpoint and raise `Interrupted` (one line, exit 128 + signal; the rerun resumes)."""
        try:
            with interrupts.deferred() as flag:
                self._loop(flag)
        finally:
            self.log.close()   # TensorBoard's writer thread holds events until closed
            self.release()

    def _loop(self, flag) -> None:
        t = self.t
        bar = tqdm(total=self.total_steps, initial=self.start, unit="step", dynamic_ncols=True,
                   disable=not (t.progress and self.main), file=sys.stderr)
        compiled = None
        window_t0, window_steps = time.perf_counter(), 0
        tokens_per_step = self.n_streams * t.grad_accum * t.seq_len
        for step in range(self.start, self.total_steps):
            batch = self.batch(step)
            if compiled is None:
                c0 = time.perf_counter()
                compiled = self.step_fn.lower(self.state, self.frozen, self.mem, batch).compile()
                self.compile_s = time.perf_counter() - c0
                window_t0 = time.perf_counter()
            if t.signal_every and step % t.signal_every == 0:
                self.log.write(step, self.memory_signals(batch))
                window_t0, window_steps = time.perf_counter(), 0
            self.state, self.mem, out = compiled(self.state, self.frozen, self.mem, batch)
            window_steps += 1
            done = step + 1
            last = done == self.total_steps
            if done % t.log_every == 0 or last:
                values = {k: float(v) for k, v in jax.device_get(out).items()}
                elapsed = time.perf_counter() - window_t0
                step_s = elapsed / window_steps
                values.update(ppl=math.exp(min(values["loss"], 50.0)), step_s=step_s,
                              tokens_per_s=tokens_per_step / step_s,
                              tflops_per_device=self.flops["flops_per_replica_step"] / step_s / 1e12,
                              epoch=self.streams.cursor(done)["epoch"])
                if self.peak:
                    values["mfu"] = values["tflops_per_device"] / self.peak
                if self.compile_s is not None:
                    values["compile_s"] = self.compile_s
                    self.compile_s = None
                self.log.write(done, values)
                bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}",
                                tok_s=f"{values['tokens_per_s']:.0f}")
                window_t0, window_steps = time.perf_counter(), 0
            if done % t.checkpoint_every == 0 or last:
                self.save(done)
            if (t.eval_every and done % t.eval_every == 0) or last:
                result = self.evaluate()
                if result:
                    self.log.write(done, result)
                    bar.write(f"step {done}: val_loss {result['val_loss']:.4f} "
                              f"val_ppl {result['val_ppl']:.2f}")
                window_t0, window_steps = time.perf_counter(), 0
            bar.update(1)
            # Every host stops after the same step (the save is collective).
            if not last and sharding.any_process(flag.signum is not None):
                bar.close()
                if done % t.checkpoint_every:
                    self.save(done)
                self.ckpt.wait()
                raise interrupts.Interrupted(
                    flag.signum or signal.SIGTERM, f"checkpoint {done} saved in "
                    f"{self.ckpt.directory}; run the same command to resume")
        bar.close()
        self.ckpt.wait()
        if t.export_dir:
            frozen, trainable = sharding.gather((self.frozen, self.state["trainable"]))
            if self.main:
                export.export_merged(frozen, trainable, self.run, self.model, self.base_dtypes,
                                     t.export_dir, t.export_hf)
        self.ckpt.close()


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    assignments = [item for group in args.set for item in group]
    run = cfgmod.resolve(args.config, assignments)
    hosts.join(args)
    model = cfgmod.model_config(run)
    run = cfgmod.validate(run, model)
    if args.dry_run:
        print(dry_run_report(run, model))
        return
    trainer = Trainer(run, model)
    if trainer.main:
        print(f"training {run.name}: steps {trainer.start}..{trainer.total_steps}, "
              f"{trainer.n_streams} stream(s), {trainer.blocks.n_train} train / "
              f"{trainer.blocks.n_val} validation blocks of {run.train.seq_len} tokens; "
              f"output {run.train.output_dir}", file=sys.stderr)
    trainer.train()


cli = hosts.entry_point(main)   # the console script

if __name__ == "__main__":
    sys.exit(cli())
