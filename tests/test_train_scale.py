"""train/ in a subprocess: an 8-device (data x fsdp) CPU mesh matches the unsharded run of the
same global batch. (Exact resume after SIGKILL: test_faults.py, with the other interruptions.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers import toy_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
