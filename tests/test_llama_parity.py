"""Converted random torch LLaMAs give the same fp32 logits as torch, in every HF format."""

import os

import numpy as np
import pytest

from helpers import LLAMA_SHAPES, random_torch_llama, save_torch_llama, torch_logits
import memlong_jax as ml
from convert.from_hf import main as from_hf

CASES = [
    ("mha_untied", "safetensors"),
    ("gqa_tied", "sharded_safetensors"),
    ("odd_head_dim", "bin"),
    ("explicit_head_dim_gqa", "sharded_bin"),
    ("gqa_tied", "bin"),
    ("odd_head_dim", "safetensors"),
]


@pytest.mark.parametrize("shape,fmt", CASES)
def test_logits_match_torch(tmp_path, shape, fmt):
    torch_model = random_torch_llama(seed=hash((shape, fmt)) % 1000, **LLAMA_SHAPES[shape])
    save_torch_llama(torch_model, tmp_path / "hf", fmt)
    files = os.listdir(tmp_path / "hf")
    assert any(f.endswith(".bin" if "bin" in fmt else ".safetensors") for f in files)
    assert ("index.json" in " ".join(files)) == fmt.startswith("sharded")
    from_hf([str(tmp_path / "hf"), str(tmp_path / "jax"), "--quiet", "--no-tokenizer"])
    model = ml.load(str(tmp_path / "jax"))

    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(2, 37))
    expected = torch_logits(torch_model, ids)
    got = np.asarray(model.logits(ids))
    assert got.shape == expected.shape == (2, 37, model.config.vocab_size)
    assert np.abs(expected).max() > 1.0, "logits too small for the comparison to mean much"
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_bf16_compute_tracks_fp32(tmp_path):
    """bf16 compute (fp32 norm and softmax) stays close to fp32: bf16 has ~3 significant digits."""
    torch_model = random_torch_llama(seed=3, **LLAMA_SHAPES["gqa_tied"])
    save_torch_llama(torch_model, tmp_path / "hf", "safetensors")
    from_hf([str(tmp_path / "hf"), str(tmp_path / "jax"), "--quiet", "--no-tokenizer"])
    ids = np.random.default_rng(1).integers(0, 211, size=(1, 64))
    fp32 = np.asarray(ml.load(str(tmp_path / "jax")).logits(ids))
    bf16_model = ml.load(str(tmp_path / "jax"), dtype="bfloat16")
    bf16 = np.asarray(bf16_model.logits(ids)).astype(np.float32)
    assert bf16_model.logits(ids).dtype == np.dtype("bfloat16")
    scale = np.abs(fp32).max()
    assert np.abs(bf16 - fp32).max() < 0.05 * scale
    assert (bf16.argmax(-1) == fp32.argmax(-1)).mean() > 0.9


def test_positions_shift_is_invisible(tmp_path):
    """RoPE is relative: shifting every position id by a constant leaves logits unchanged."""
    torch_model = random_torch_llama(seed=4, **LLAMA_SHAPES["mha_untied"])
    save_torch_llama(torch_model, tmp_path / "hf", "safetensors")
    from_hf([str(tmp_path / "hf"), str(tmp_path / "jax"), "--quiet", "--no-tokenizer"])
    model = ml.load(str(tmp_path / "jax"))
    ids = np.random.default_rng(2).integers(0, 211, size=(1, 16))
    base = model.module.apply({"params": model.params}, ids)
    shifted = model.module.apply({"params": model.params}, ids, np.arange(16)[None] + 1)
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(base), atol=1e-4)
