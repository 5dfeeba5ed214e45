"""experiments/memory_gain_curve.py: fixed held-out batches, scored as training scores them.

The reference is independent of the memory code: with each layer reading its own K/V at true
positions and everything retrieved (test_memory_signals' setup), a block read with the memory of
the earlier blocks of its batch is plain causal attention over the batch's blocks concatenated,
and a block read without memory is the plain model on that block alone.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import memory_gain_curve as curve
from experiments import train15_report
from memlong_jax.errors import UserError, run_cli
from memlong_jax.memlong.retrievers import HIDDEN
from test_memory_signals import _setup, plain_nll
from train import data as datamod
from train import lora


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
