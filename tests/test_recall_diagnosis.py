"""experiments/recall_diagnosis.py's arithmetic and attention-mass probe, and its report
generator (inputs fabricated here)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import recall_diagnosis, recall_diagnosis_report
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.memlong import diagnostics, scan
from memlong_jax.presets import PRESETS

REPO = os.path.join(os.path.dirname(__file__), "..")


def test_summary_arithmetic():
    rng = np.random.default_rng(0)
    local, full, row = (rng.uniform(1, 4, size=(2, 1023)) for _ in range(3))
    got = recall_diagnosis.summarise(row, local, full)
    assert got["nll"] == pytest.approx(row.mean())
    assert got["gap_recovered"] == pytest.approx((local.mean() - row.mean())
                                                 / (local.mean() - full.mean()))
    last = slice(1023 - 512, None)
    assert got["copy_nll"] == pytest.approx(row[:, last].mean())
    assert got["diff_vs_local_by_position"][0] == pytest.approx((row - local)[:, :128].mean())


def slow_mass(params, h, mem_keys, valid, layer, cfg, weights=None):
    """Mass on memory (on the memory tokens with weight 1) of one layer, float64, one query and
    head at a time: `[queries, heads]`."""
    p = params["model"][f"layers_{layer}"]
    w = lambda name: np.asarray(p["self_attn"][name]["kernel"], np.float64)
    h = np.asarray(h, np.float64)[0]
    x = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps)
    x = x * np.asarray(p["input_layernorm"]["weight"], np.float64)
    d, heads, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    q, k = (x @ w("q_proj")).reshape(len(x), heads, d), (x @ w("k_proj")).reshape(len(x), kv, d)

    def rope(v, pos):
        inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
        ang = np.concatenate([pos * inv, pos * inv])
        return v * np.cos(ang) + np.concatenate([-v[d // 2:], v[:d // 2]]) * np.sin(ang)

    slots = [m for m in range(mem_keys.shape[1]) if valid[0, m]]
    w = np.ones(len(slots)) if weights is None else np.asarray(weights)[0, slots]
    out = np.zeros((len(x), heads))
    for head in range(heads):
        g = head // (heads // kv)
        for t in range(len(x)):
            qt = rope(q[t, head], t + 1)
            mem = [qt @ mem_keys[0, m, g] for m in slots]
            loc = [qt @ rope(k[j, g], j + 1) for j in range(t + 1)]
            s = np.array(mem + loc) / np.sqrt(d)
            e = np.exp(s - s.max())
            out[t, head] = (e[:len(mem)] * w).sum() / e.sum()
    return out


def mass_inputs(seed):
    """A tiny model with sharp weights that has read 20 random tokens, the next 8 tokens' hidden
    states entering the memory layer and the K/V they retrieve: (cfg, module, mcfg, params,
    state, ids, h, kv)."""
    cfg = PRESETS["tiny"].model
    module = LlamaForCausalLM(cfg)
    params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree_util.tree_map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
    mcfg = PRESETS["tiny"].memlong.replace(retrieval_layers=(1,), top_k=3)
    ids = jax.random.randint(jax.random.PRNGKey(seed + 1), (1, 28), 0, cfg.vocab_size)
    state = scan.ingest_prefix(module, mcfg, params, scan.init_state(module, mcfg, 1),
                                  ids[:, :20])
    _, h, _, _, _ = scan.lower_stack(module, mcfg, params, ids[:, 20:])
    memory, indices, found = scan.retrieve_chunks(mcfg, state.memory, state.last_emb,
                                                     state.has_last)
    return cfg, module, mcfg, params, state, ids, h, scan.retrieved_kv(memory, indices, found)


def test_memory_mass_equals_a_slow_softmax():
    cfg, module, mcfg, params, state, ids, h, kv = mass_inputs(0)
    got = np.asarray(recall_diagnosis.memory_mass(module, mcfg, params, state, ids[:, 20:]))
    want = slow_mass(params, h, np.asarray(kv.keys, np.float64), np.asarray(kv.valid), 1, cfg)
    np.testing.assert_allclose(got[0], want.mean(0), atol=1e-5)
    assert want.min() > 0.01
    # the mass on some memory tokens only, at chosen query positions
    weights = (np.random.default_rng(2).random(kv.valid.shape) < 0.3).astype(np.float32)
    at = np.asarray([0, 5, 7])
    positions = jnp.broadcast_to(jnp.arange(1, 9), (1, 8))
    part = np.asarray(diagnostics.memory_mass(module, mcfg, params, h, positions, kv,
                                              weights=jnp.asarray(weights), at=jnp.asarray(at)))
    slow = slow_mass(params, h, np.asarray(kv.keys, np.float64), np.asarray(kv.valid), 1, cfg,
                     weights)
    np.testing.assert_allclose(part[0, 0], slow[at], atol=1e-5)
    assert 0.01 < slow[at].min() and (slow[at] < want[at] - 1e-3).all()


def test_memory_mass_skip_leaves_out_the_first_queries():
    """`skip` (a context run in front of the segment): the mean over the queries after it only."""
    seed = int(np.random.default_rng().integers(1 << 30))
    cfg, module, mcfg, params, _, _, h, kv = mass_inputs(seed)
    slow = slow_mass(params, h, np.asarray(kv.keys, np.float64), np.asarray(kv.valid), 1, cfg)
    positions = jnp.broadcast_to(jnp.arange(1, 9), (1, 8))
    for skip in (1, 3, 6):
        got = np.asarray(diagnostics.memory_mass(module, mcfg, params, h, positions, kv,
                                                 skip=skip))
        np.testing.assert_allclose(got[0, 0], slow[skip:].mean(0), atol=1e-5)
        for other in (skip - 1, skip + 1):      # the skip matters on these inputs
            assert np.abs(slow[other:].mean(0) - slow[skip:].mean(0)).max() > 1e-3


def fake_results():
    steps = [{"name": "local", "label": "local", "mode": "local", "memlong": None,
              "memory_mass": None},
             {"name": "a", "label": "today", "mode": "memlong",
              "memlong": {"retrieval_layers": [19, 15]}, "memory_mass": [[0.25, 0.5], [0.1, 0.3]]}]
    row = lambda nll: {"nll": nll, "copy_nll": nll - 1, "gap_recovered": 0.125,
                       "copy_gap_recovered": -0.5, "diff_vs_local_by_position": [0.5, -0.25],
                       "per_window_nll": [nll]}
    texts = {t: {"local": row(3.0), "a": row(3.25)} for t in ("book", "repeat")}
    return {"date": "today", "command": "x", "config": {
        "windows": 1, "length": 2048, "local_window": 1024, "base": {"chunk_size": 128,
                                                                      "top_k": 8}},
            "results": {"steps": steps, "texts": texts}}


def test_report_tables_and_kept_prose(tmp_path):
    path, doc = tmp_path / "r.json", tmp_path / "doc.md"
    path.write_text(json.dumps(fake_results()))
    doc.write_text(f"# Title\n\nintro\n{recall_diagnosis_report.BEGIN}\nold\n"
                   f"{recall_diagnosis_report.END}\n\nfindings by hand\n")
    assert recall_diagnosis_report.main([str(path), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "intro" in text and "findings by hand" in text and "\nold\n" not in text
    assert "| a: today | 3.250 | 12% | 2.250 | -50% |" in text
    assert "| a | +0.500 | -0.250 |" in text
    assert "| a | 15 | 38% | 25% | 50% | 25 50 |" in text   # layers in ascending order


def test_report_missing_input_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.recall_diagnosis_report",
                           str(tmp_path / "none.json"), "--doc", str(tmp_path / "d.md")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d.md").exists()
