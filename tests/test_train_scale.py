"""train/ in subprocesses: exact resume after SIGKILL, and an 8-device (data x fsdp) CPU mesh
that matches the unsharded run of the same global batch."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import toy_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_cmd(data, out, cache, steps):
    return [sys.executable, "-m", "train.run", "--config", "tiny", "--set", f"data={data}",
            f"output_dir={out}", f"cache_dir={cache}", f"steps={steps}", "log_every=1",
            "checkpoint_every=1", "keep_checkpoints=2", "eval_batches=0", "progress=false",
            "tensorboard=false"]


def _final_state(out):
    manager = ocp.CheckpointManager(os.path.join(out, "checkpoints"))
    step = manager.latest_step()
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return step, state["state"]


def _logged_steps(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [json.loads(line)["step"] for line in open(path) if line.endswith("\n")]
    return max(steps, default=0)


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    steps = 16
    data = toy_corpus(tmp_path / "toy.txt", seed=11)
    cache = tmp_path / "cache"
    full = subprocess.run(_train_cmd(data, tmp_path / "full", cache, steps), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr

    kill_at = random.Random(2408).randint(3, steps // 2)
    proc = subprocess.Popen(_train_cmd(data, tmp_path / "killed", cache, steps), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while _logged_steps(tmp_path / "killed") < kill_at and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_step, _ = _final_state(tmp_path / "killed")
    assert killed_step < steps

    resumed = subprocess.run(_train_cmd(data, tmp_path / "killed", cache, steps), cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"steps {killed_step}..{steps}" in resumed.stderr

    step_a, a = _final_state(tmp_path / "full")
    step_b, b = _final_state(tmp_path / "killed")
    assert step_a == step_b == steps
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b and len(leaves_a) > 20
    for x, y in zip(leaves_a, leaves_b):  # params, optimizer, memory, RNG, step: bit-identical
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


MESH_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, jax
    from train import config as cfgmod
    from train.run import Trainer
    assert jax.device_count() == 8
    data, root = sys.argv[1], sys.argv[2]
    def go(name, sets):
        run = cfgmod.resolve("tiny", ["steps=3", "log_every=1", "progress=false",
            "eval_batches=0", "tensorboard=false", f"output_dir={root}/{name}",
            f"cache_dir={root}/cache", f"data={data}"] + sets)
        model = cfgmod.model_config(run)
        trainer = Trainer(cfgmod.validate(run, model), model)
        trainer.train()
        shardings = {str(x.sharding.spec) for x in
                     jax.tree_util.tree_leaves(trainer.state["trainable"])}
        mem_spec = str(trainer.mem.memory.keys.sharding.spec)
        losses = [json.loads(l)["loss"] for l in open(f"{root}/{name}/metrics.jsonl")]
        tree = {"trainable": trainer.state["trainable"], "memory": trainer.mem}
        return losses, [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(
            jax.device_get(tree))], sorted(shardings), mem_spec
    a = go("mesh", ["mesh_data=2", "mesh_fsdp=4", "rows_per_replica=1"])
    b = go("single", ["mesh_data=1", "mesh_fsdp=1", "rows_per_replica=8"])
    print(json.dumps({
        "losses": [a[0], b[0]],
        "param_diff": max(float(np.abs(x - y).max()) for x, y in zip(a[1], b[1])),
        "param_moved": max(float(np.abs(x).max()) for x in a[1]),
        "shardings": a[2], "mem_spec": a[3], "single_shardings": b[2]}))
""")


@pytest.mark.slow   # CI time (40 s); `make test-all` runs it
def test_eight_device_mesh_matches_unsharded(tmp_path):
    """data=2 x fsdp=4 over 8 forced CPU devices vs 1 device with the same 8 streams.

    Tolerance: sharding only reorders fp32 reductions (matmul contractions split over fsdp,
    the loss mean over rows, gradient all-reduces), each a few ulp (~1e-7 relative); 3 Adam
    steps at lr <= 3e-3 amplify that at most to ~1e-6 in the params (measured ~1e-7). 1e-5 is
    far below the ~lr per step that any real mismatch (a wrong row, stream or memory) moves a
    parameter, and far below the loss differences such a mismatch makes.
    """
    data = toy_corpus(tmp_path / "toy.txt", seed=12, repeats=100)
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
               + " --xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", MESH_SCRIPT, data, str(tmp_path)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    sharded, single = out["losses"]
    assert len(sharded) == 3
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    assert out["param_diff"] < 1e-5 and out["param_moved"] > 1e-3
    assert any("fsdp" in s for s in out["shardings"])  # params really were sharded
    assert "data" in out["mem_spec"] and "fsdp" in out["mem_spec"]
