"""Presets, HF config round trips, shape-only parameter counts, and config validation."""

import json

import pytest
from transformers import LlamaConfig as HFConfig

import memlong_jax as ml
from memlong_jax.io.checkpoint import abstract_params, param_count
from memlong_jax.llama.config import ConfigError, LlamaConfig

# The public openlm-research/open_llama_3b_v2 config.json, field by field.
OPEN_LLAMA_3B_V2 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 3200, "intermediate_size": 8640, "num_attention_heads": 32,
    "num_hidden_layers": 26, "max_position_embeddings": 2048, "rms_norm_eps": 1e-06,
    "vocab_size": 32000, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0, "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float16",
}


def expected_param_count(c: LlamaConfig) -> int:
    attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    layer = attn + mlp + 2 * c.hidden_size
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    return c.vocab_size * c.hidden_size + c.num_hidden_layers * layer + c.hidden_size + head


def test_openllama3b_preset_is_the_public_config():
    assert ml.PRESETS["openllama3b"].model == LlamaConfig.from_hf_dict(OPEN_LLAMA_3B_V2)
    c = ml.PRESETS["openllama3b"].model
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.head_dim) == (26, 3200, 32, 100)
    assert (c.intermediate_size, c.vocab_size, c.rms_norm_eps) == (8640, 32000, 1e-6)
    assert (c.max_position_embeddings, c.tie_word_embeddings) == (2048, False)


@pytest.mark.parametrize("name", sorted(ml.PRESETS))
def test_param_count_from_shapes_alone(name):
    config = ml.PRESETS[name].model
    assert param_count(config) == expected_param_count(config)


def test_openllama3b_shapes_without_allocating():
    params = abstract_params(ml.PRESETS["openllama3b"].model)
    q = params["model"]["layers_25"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (3200, 3200) and params["lm_head"]["kernel"].shape == (3200, 32000)
    assert param_count(ml.PRESETS["openllama3b"].model) == 3_426_473_600


@pytest.mark.parametrize("name", sorted(ml.PRESETS))
def test_hf_dict_round_trip(name, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(ml.PRESETS[name].model.to_hf_dict()))
    assert ml.get_config(str(tmp_path)) == ml.PRESETS[name].model
    assert ml.get_config(str(path)) == ml.PRESETS[name].model


@pytest.mark.parametrize("name", sorted(ml.PRESETS))
def test_transformers_reads_our_config(name):
    """transformers reads every field we write with its value, and what it writes back is the
    same architecture to us."""
    ours = ml.PRESETS[name].model.to_hf_dict()
    hf = HFConfig(**ours)
    theirs = {**hf.to_dict(), **(hf.to_dict().get("rope_parameters") or {})}  # transformers 5
    for key, value in ours.items():
        if key not in ("architectures", "model_type", "torch_dtype"):
            assert theirs.get(key) == value, key
    assert LlamaConfig.from_hf_dict(hf.to_dict()) == ml.PRESETS[name].model


@pytest.mark.parametrize("change,field", [
    (dict(num_attention_heads=5, num_key_value_heads=2), "num_key_value_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_bad_values_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        ml.PRESETS["tiny"].model.replace(**change)


@pytest.mark.parametrize("change,words", [
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "unsupported architecture"),
])
def test_unsupported_hf_configs(change, words):
    with pytest.raises(ConfigError, match=words):
        LlamaConfig.from_hf_dict({**OPEN_LLAMA_3B_V2, **change})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown config"):
        ml.get_config("llama-9000")
