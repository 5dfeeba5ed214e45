"""Training checkpoints: an orbax `CheckpointManager` (stable v0 API), async, last N kept.

A checkpoint `OUTPUT/checkpoints/<step>/` holds
  state   StandardSave: step, trainable params, optimizer state, RNG, MemLong memory state
  cursor  JsonSave: the data cursor (micro-steps consumed, epoch, position in the streams)
  config  JsonSave: the resolved config (preset, train, memlong) and the model's HF config
Orbax writes into a temporary directory and renames it on commit, so a run killed mid-save
leaves no checkpoint that `latest_step` would pick up; one damaged later (a file truncated or
deleted) is skipped by `train.resume.restore_newest`.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import orbax.checkpoint as ocp

from memlong_jax.memlong import scan
from memlong_jax.memlong.memory import Memory


def state_to_tree(mem: scan.MemLongState) -> dict:
    return {"memory": {f.name: getattr(mem.memory, f.name)
                       for f in dataclasses.fields(Memory)},
            "last_emb": mem.last_emb, "has_last": mem.has_last}


def tree_to_state(tree: dict) -> scan.MemLongState:
    return scan.MemLongState(Memory(**tree["memory"]), tree["last_emb"], tree["has_last"])


class Checkpoints:
    def __init__(self, directory: str, keep: int, use_async: bool):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=use_async)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "cursor", "config"))

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def set_aside(self, step: int, directory: str) -> str:
        """Move checkpoint `step` out of the manager's sight into `directory` (the first host
        moves it, the others only forget it); returns where."""
        target, n = os.path.join(directory, str(step)), 1
        while os.path.exists(target):
            target, n = os.path.join(directory, f"{step}.{n}"), n + 1
        if jax.process_index() == 0:
            os.makedirs(directory, exist_ok=True)
            os.rename(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target

    def save(self, step: int, state: dict, cursor: dict, config: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), cursor=ocp.args.JsonSave(cursor),
            config=ocp.args.JsonSave(config)), force=True)

    def read_json(self, step: int) -> tuple[dict, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(
            cursor=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
        return dict(out["cursor"]), dict(out["config"])

    def restore_state(self, step: int, abstract_state):
        """`abstract_state`: ShapeDtypeStructs with the target shardings."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return out["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree, shardings):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
