"""from_hf -> to_hf gives back the original tensors bit for bit, and torch loads the result."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import LlamaForCausalLM

from helpers import LLAMA_SHAPES, random_torch_llama, save_torch_llama, torch_logits
from memlong_jax.io.hf_sources import torch_to_numpy
from convert.from_hf import main as from_hf
from convert.to_hf import main as to_hf


@pytest.mark.parametrize("shape,dtype", [("mha_untied", torch.float32),
                                         ("gqa_tied", torch.bfloat16),
                                         ("odd_head_dim", torch.float16)])
def test_round_trip_is_bit_exact(tmp_path, shape, dtype):
    model = random_torch_llama(seed=7, **LLAMA_SHAPES[shape]).to(dtype)
    save_torch_llama(model, tmp_path / "hf", "safetensors")
    from_hf([str(tmp_path / "hf"), str(tmp_path / "jax"), "--quiet"])
    to_hf([str(tmp_path / "jax"), str(tmp_path / "back"), "--quiet"])

    original = {k: torch_to_numpy(v) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del original["lm_head.weight"]
    restored = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert restored.keys() == original.keys()
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype, name
        assert restored[name].tobytes() == tensor.tobytes(), name

    # Load both through from_pretrained: `model.to(dtype)` would also cast RoPE's inv_freq buffer.
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "back", dtype=dtype).eval()
    reference = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=dtype).eval()
    ids = np.random.default_rng(0).integers(0, 211, size=(1, 19))
    np.testing.assert_array_equal(torch_logits(reloaded, ids), torch_logits(reference, ids))


def test_dtype_flag_casts_stored_params(tmp_path):
    model = random_torch_llama(seed=8, **LLAMA_SHAPES["mha_untied"])
    save_torch_llama(model, tmp_path / "hf", "safetensors")
    from_hf([str(tmp_path / "hf"), str(tmp_path / "jax"), "--quiet", "--dtype", "bfloat16"])
    to_hf([str(tmp_path / "jax"), str(tmp_path / "back"), "--quiet"])
    restored = load_file(str(tmp_path / "back" / "model.safetensors"))
    expected = torch_to_numpy(model.state_dict()["model.layers.1.mlp.up_proj.weight"].bfloat16())
    assert restored["model.layers.1.mlp.up_proj.weight"].tobytes() == expected.tobytes()
