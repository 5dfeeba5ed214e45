"""experiments/memory_gain_curve.py: fixed held-out batches, scored as training scores them.

The reference is independent of the memory code: with each layer reading its own K/V at true
positions and everything retrieved (test_memory_signals' setup), a block read with the memory of
the earlier blocks of its batch is plain causal attention over the batch's blocks concatenated,
and a block read without memory is the plain model on that block alone.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from experiments import memory_gain_curve as curve
from experiments import train15_report
from helpers import toy_corpus
from memlong_jax.errors import UserError, run_cli
from memlong_jax.memlong import scan
from memlong_jax.memlong.retrievers import HIDDEN
from test_memory_signals import _setup, plain_nll
from train import adapter
from train import config as cfgmod
from train import data as datamod
from train import lora, signals
from train.export import export_run
from train.run import Trainer


def block_means(nll: np.ndarray, blocks: int, seq: int) -> np.ndarray:
    """Per-block mean NLL `[B, blocks]` of per-token NLL over concatenated blocks `[B, T-1]`,
    each block's own predictions only (its first token is not predicted inside the block)."""
    return np.stack([nll[:, i * seq:(i + 1) * seq - 1].mean(axis=1) for i in range(blocks)], 1)


def test_gain_equals_plain_attention_over_each_batch():
    cfg, module, mcfg, frozen, trainable, t = _setup(4)
    mcfg = mcfg.replace(query_mode="chunk")          # 2 chunks per block; top-4 takes them all
    seq, micro, n_batches = 8, 3, 2
    rng = np.random.default_rng(5)
    batches = rng.integers(0, cfg.vocab_size, (n_batches, micro, seq)).astype(np.int32)
    scorer = curve.GainScorer(module, mcfg, t, frozen, HIDDEN, None)
    (kind, row), = curve.score_point(scorer, trainable, {"plain": batches})

    params = lora.merge(frozen, trainable, t.lora_alpha / t.lora_rank)
    together = block_means(plain_nll(module, params, jnp.asarray(batches.reshape(n_batches, -1))),
                           micro, seq)                               # [batch, block]
    alone = np.stack([plain_nll(module, params, jnp.asarray(batches[:, i])).mean(axis=1)
                      for i in range(micro)], 1)
    gains = alone.mean(axis=1) - together.mean(axis=1)
    assert kind == "plain" and row["batches"] == n_batches
    np.testing.assert_allclose(row["gain_per_batch"], gains, atol=2e-5)
    np.testing.assert_allclose(row["loss_memory"], together.mean(), rtol=1e-5)
    np.testing.assert_allclose(row["loss_no_memory"], alone.mean(), rtol=1e-5)
    np.testing.assert_allclose([row["gain_min"], row["gain_max"]], [gains.min(), gains.max()],
                               atol=2e-5)
    assert np.all(np.abs(gains) > 1e-3)   # memory changes something on these weights


def test_full_reference_is_plain_attention_over_each_batch():
    """`--full`: each batch read by the plain model over its blocks concatenated, independent of
    what memory retrieves (top-1 here: memory sees less than full attention does)."""
    cfg, module, mcfg, frozen, trainable, t = _setup(7)
    mcfg = mcfg.replace(query_mode="chunk", top_k=1)
    seq, micro, n_batches = 8, 3, 2
    batches = np.random.default_rng().integers(0, cfg.vocab_size,
                                               (n_batches, micro, seq)).astype(np.int32)
    scorer = curve.GainScorer(module, mcfg, t, frozen, HIDDEN, None, full=True)
    (_, row), = curve.score_point(scorer, trainable, {"plain": batches})

    params = lora.merge(frozen, trainable, t.lora_alpha / t.lora_rank)
    together = block_means(plain_nll(module, params, jnp.asarray(batches.reshape(n_batches, -1))),
                           micro, seq).mean(axis=1)
    alone = np.stack([plain_nll(module, params, jnp.asarray(batches[:, i])).mean(axis=1)
                      for i in range(micro)], 1).mean(axis=1)
    np.testing.assert_allclose(row["loss_full"], together.mean(), rtol=1e-5)
    np.testing.assert_allclose(row["full_gain_per_batch"], alone - together, atol=2e-5)
    np.testing.assert_allclose(row["full_gain"], (alone - together).mean(), atol=2e-5)
    assert abs(row["loss_full"] - row["loss_memory"]) > 1e-3   # top-1 memory is not full


def test_overlap_scores_each_block_after_the_tail_of_the_one_before():
    """A run trained with `prefix_overlap=p` is scored with it: micro-step i > 0 of a batch has
    the last p chunks of block i - 1 in front, the first none (a fresh memory per batch), i.e.
    `train.signals` with that context built here by hand."""
    cfg, module, mcfg, frozen, trainable, t = _setup(6)
    mcfg = mcfg.replace(query_mode="chunk", prefix_context="window", prefix_overlap=2,
                        memory_tokens=64)
    seq, micro, n_batches, width = 3 * mcfg.chunk_size, 3, 2, 2 * mcfg.chunk_size
    batches = np.random.default_rng().integers(0, cfg.vocab_size,
                                               (n_batches, micro, seq)).astype(np.int32)
    scorer = curve.GainScorer(module, mcfg, t, frozen, HIDDEN, None)
    (_, row), = curve.score_point(scorer, trainable, {"plain": batches})

    signal = jax.jit(signals.make_signal_step(module, mcfg, t, with_mass=False))
    empty = scan.init_state(module, mcfg, 1)
    want, without_context = [], []
    for ids in batches:
        context = np.zeros((micro, 1, width), np.int32)
        for i in range(1, micro):
            context[i, 0] = ids[i - 1, -width:]
        batch = {"ids": ids[:, None], "context": context, "has_context": np.arange(micro) > 0}
        want.append(signal(trainable, frozen, empty, batch))
        without_context.append(signal(trainable, frozen, empty, {"ids": ids[:, None]}))
    gains = [float(w["memory_gain"]) for w in want]
    np.testing.assert_allclose(row["gain_per_batch"], gains, atol=1e-6)
    np.testing.assert_allclose(row["loss_memory"],
                               np.mean([w["signal_loss"] for w in want]), rtol=1e-6)
    np.testing.assert_allclose(row["loss_no_memory"],
                               np.mean([w["signal_loss_no_memory"] for w in want]), rtol=1e-6)
    dropped = [float(w["memory_gain"]) for w in without_context]
    # the context matters here, so the comparison above can fail (one batch's gain may move
    # little with fresh random ids: 0.0009 once; the largest moved 0.02-0.18 in 8 probe runs)
    assert np.max(np.abs(np.subtract(gains, dropped))) > 1e-3


def _tiny_run(tmp_path, name, data, *sets):
    run = cfgmod.resolve("tiny", [f"output_dir={tmp_path / name}", f"data={data}",
                                  f"cache_dir={tmp_path / 'cache'}", "progress=false",
                                  "tensorboard=false", "eval_batches=0", "val_fraction=0.2",
                                  *sets])
    model = cfgmod.model_config(run)
    trainer = Trainer(cfgmod.validate(run, model), model)
    try:
        trainer.train()
    finally:
        trainer.release()
    return trainer


@pytest.mark.slow   # trains a tiny run and exports an adapter first (about 50 s)
def test_step_0_of_an_init_adapter_run_is_the_adapter(tmp_path):
    """A run started from an adapter starts from its trained parameters: step 0 scores exactly
    as that adapter passed with --adapter does, and is labelled so."""
    data = toy_corpus(tmp_path / "toy.txt", seed=4)
    _tiny_run(tmp_path, "first", data, "steps=2", "lr=1e-2")
    export_run(str(tmp_path / "first"), str(tmp_path / "adapter"), adapter_only=True)
    _tiny_run(tmp_path, "second", data, "steps=1", f"init_adapter={tmp_path / 'adapter'}")
    common = ["--batches", "2", "--kinds", "plain", "--cache-dir", str(tmp_path / "cache")]

    def curve_rows(run_dir, *args):
        out = tmp_path / f"{run_dir}.json"
        assert run_cli(curve.main, [str(tmp_path / run_dir), *args, *common,
                                    "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        return result["config"]["points"], {r["step"]: r["gain_per_batch"] for r in result["rows"]}

    points, gains = curve_rows("second", "--steps", "0", "--adapter", str(tmp_path / "adapter"))
    assert sorted(gains) == [0, 2]                     # the adapter records its step 2
    assert points["0"] == f"init_adapter {tmp_path / 'adapter'} (its step 2)"
    assert gains[0] == gains[2]
    base_points, base = curve_rows("first", "--steps", "0")
    assert base_points["0"] == "base model (LoRA zero)"
    assert np.all(np.abs(np.subtract(base[0], gains[0])) > 1e-6)   # two steps of training
    read_points, top_1 = curve_rows("first", "--steps", "0", "--read", "top_k=1")
    assert np.all(np.abs(np.subtract(base[0], top_1[0])) > 1e-6)     # the preset reads top-2
    assert run_cli(curve.main, [str(tmp_path / "first"), "--read", "top_k=x"]) == 2
    _, read_adapter = curve_rows("second", "--adapter", str(tmp_path / "adapter"),
                                 "--read", "top_k=1")             # an adapter read otherwise
    assert np.all(np.abs(np.subtract(read_adapter[2], gains[2])) > 1e-6)


def test_validation_batches_are_the_held_out_blocks_in_order():
    seq, grad_accum = 4, 2
    tokens = np.random.default_rng(0).integers(0, 500, 40 * seq).astype(np.uint16)
    blocks = datamod.Blocks(tokens, seq, 0.25)                       # 30 train, 10 validation
    got = curve.validation_batches(blocks, grad_accum, 3)
    assert got.shape == (3, grad_accum, seq)
    for b in range(3):
        for i in range(grad_accum):
            start = (30 + b * grad_accum + i) * seq
            np.testing.assert_array_equal(got[b, i], tokens[start:start + seq])
    with pytest.raises(UserError, match="fewer than 6 batches"):
        curve.validation_batches(blocks, grad_accum, 6)


def test_recall_episodes_stay_inside_a_batch():
    seq, tok = 64, datamod.ByteTokenizer()
    batches = np.random.default_rng(1).integers(0, 256, (2, 4, seq)).astype(np.int32)
    kinds = curve.kind_batches(batches, ("plain", "repeat"), ("facts",), tok, 2, seed=3)
    assert kinds["plain"] is batches
    repeat = kinds["repeat"]
    for b in range(2):
        for first in (0, 2):     # episodes of 2 blocks: the earlier block comes back in the last
            earlier, last = repeat[b, first], repeat[b, first + 1]
            np.testing.assert_array_equal(earlier, batches[b, first])
            assert not np.array_equal(last, batches[b, first + 1])
            run = seq // 8
            windows = {earlier[i:i + run].tobytes() for i in range(seq - run + 1)}
            assert any(last[i:i + run].tobytes() in windows for i in range(seq - run + 1))
    with pytest.raises(UserError, match="straddle"):
        curve.kind_batches(batches[:, :3], ("repeat",), (), tok, 2, seed=3)


@pytest.mark.parametrize("argv, message", [
    (["/nonexistent-run"], "no checkpoints/"),
    (["/tmp", "--kinds", "plain,bogus"], "--kinds: bogus"),
    (["/tmp", "--steps", "1,x"], "comma-separated integers"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert run_cli(curve.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_report_table_shows_every_row(tmp_path):
    rows = [{"step": s, "kind": k, "batches": 2, "loss_memory": 3.0 + s / 100,
             "loss_no_memory": 3.1, "gain": 0.1 - s / 100, "gain_std": 0.01,
             "gain_per_batch": [0.09 - s / 100, 0.11 - s / 100]}
            for s in (0, 7) for k in ("plain", "recall")]
    config = {"validation_blocks": {"used": 8, "first": 30}, "batch": {"seq_len": 16,
              "grad_accum": 4}, "mix_seed": 1}
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({"config": config, "rows": rows}))
    text = train15_report.gain_curve_section(str(path))
    lines = [line for line in text.splitlines() if line.startswith("| 0 ") or
             line.startswith("| 7 ")]
    assert lines == ["| 0 | plain | 3.000 | 3.100 | 0.1000 ± 0.0100 | 0.090 / 0.110 |",
                     "| 0 | recall | 3.000 | 3.100 | 0.1000 ± 0.0100 | 0.090 / 0.110 |",
                     "| 7 | plain | 3.070 | 3.100 | 0.0300 ± 0.0100 | 0.020 / 0.040 |",
                     "| 7 | recall | 3.070 | 3.100 | 0.0300 ± 0.0100 | 0.020 / 0.040 |"]
    assert "8 validation blocks of 16 tokens" in text and "2 batches of 4" in text
    assert "not measured" in train15_report.gain_curve_section(str(tmp_path / "absent.json"))


def test_report_table_adds_the_full_attention_gain_when_measured(tmp_path):
    rows = [{"step": s, "kind": "plain", "batches": 1, "loss_memory": 3.0, "loss_no_memory": 3.1,
             "gain": 0.1, "gain_std": 0.0, "gain_per_batch": [0.1], "loss_full": 2.9 + s / 100,
             "full_gain": 0.2 - s / 100, "full_gain_per_batch": [0.2 - s / 100]} for s in (0, 5)]
    config = {"validation_blocks": {"used": 4, "first": 30}, "batch": {"seq_len": 16,
              "grad_accum": 4}, "mix_seed": 1}
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({"config": config, "rows": rows}))
    text = train15_report.gain_curve_section(str(path))
    assert "| 0 | plain | 3.000 | 3.100 | 0.1000 ± 0.0000 | 0.100 | 0.2000 |" in text
    assert "| 5 | plain | 3.000 | 3.100 | 0.1000 ± 0.0000 | 0.100 | 0.1500 |" in text
    assert "full-attention gain (nats)" in text and "Full-attention gain:" in text


def test_report_adds_the_rescored_curves_of_a_run_where_measured(tmp_path):
    row = {"step": 0, "kind": "plain", "batches": 1, "loss_memory": 3.0, "loss_no_memory": 3.1,
           "gain": 0.1, "gain_std": 0.0, "gain_per_batch": [0.1]}
    config = {"validation_blocks": {"used": 4, "first": 30}, "batch": {"seq_len": 16,
              "grad_accum": 4}, "mix_seed": 1, "read": ["top_k=24"]}
    assert train15_report.reference_sections(str(tmp_path), "runx", "run x") == ()
    (tmp_path / "memory_gain_all_runx.json").write_text(json.dumps({"config": config,
                                                                    "rows": [row]}))
    title, table = train15_report.reference_sections(str(tmp_path), "runx", "run x")
    assert "run x: the memory gain with every chunk of the batch retrieved (read with " \
           "top_k=24)" in title
    assert "| 0 | plain | 3.000 | 3.100 | 0.1000 ± 0.0000 | 0.100 |" in table
