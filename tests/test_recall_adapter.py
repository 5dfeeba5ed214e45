"""The shipped recall adapter (adapters/smollm2-135m-recall, issue 15): small, the recipe's exact
trainable tree, and merged into the bundled SmolLM2 as W + (alpha / r) A @ B."""

import os

import jax
import numpy as np
import pytest
from flax import traverse_util

import memlong_jax as ml
from memlong_jax.io import checkpoint
from memlong_jax.llama.config import DTYPES, LlamaConfig
from train import config as cfgmod
from train import lora
from train.adapter import read as read_adapter
from train.export import export_run
from train.setup import resolved_from_dict

ADAPTER = os.path.join(os.path.dirname(__file__), "..", "adapters", "smollm2-135m-recall")


def test_adapter_is_small_and_is_the_recipes_trainable_tree():
    assert os.path.getsize(os.path.join(ADAPTER, "adapter.safetensors")) <= 8 * 2 ** 20
    stored, step, trained = read_adapter(ADAPTER)
    run = resolved_from_dict(stored["run"])
    assert run.name == "smollm2-135m-recall" and step > 0
    assert run.memlong == cfgmod.PRESETS["smollm2-135m-recall"].memlong
    model = LlamaConfig.from_hf_dict(stored["model"])
    t = run.train
    abstract = checkpoint.abstract_params(model, DTYPES[t.param_dtype])
    spec = lora.plan(abstract, model, run.memlong, t.trainable, t.lora_target_list,
                     t.train_norms, t.train_from)
    _, want = jax.eval_shape(lambda p: lora.split(p, spec, t.lora_rank, jax.random.PRNGKey(0)),
                             abstract)
    want = {p: x.shape for p, x in traverse_util.flatten_dict(want).items()}
    got = {p: x.shape for p, x in traverse_util.flatten_dict(trained).items()}
    assert got == want
    moved = [p for p, x in traverse_util.flatten_dict(trained).items()
             if p[-1] == "lora_b" and np.abs(x).max() > 0]
    assert moved   # trained: B starts at zero


@pytest.mark.slow
def test_adapter_merges_into_the_bundled_model(smollm2_converted, tmp_path):
    out = str(tmp_path / "merged")
    export_run(ADAPTER, out, base=smollm2_converted)
    stored, _, trained = read_adapter(ADAPTER)
    t = resolved_from_dict(stored["run"]).train
    merged, base = ml.load(out), ml.load(smollm2_converted)
    assert merged.memlong_config.memory_positions == "near"
    layer = base.params["model"]["layers_20"]["self_attn"]["q_proj"]["kernel"]
    a, b = (np.asarray(trained["model"]["layers_20"]["self_attn"]["q_proj"][k], np.float64)
            for k in ("lora_a", "lora_b"))
    want = np.asarray(layer, np.float64) + t.lora_alpha / t.lora_rank * a @ b
    got = np.asarray(merged.params["model"]["layers_20"]["self_attn"]["q_proj"]["kernel"])
    np.testing.assert_allclose(got, want, atol=1e-5)
    untouched = base.params["model"]["layers_3"]["mlp"]["up_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(untouched), np.asarray(
        merged.params["model"]["layers_3"]["mlp"]["up_proj"]["kernel"]))
