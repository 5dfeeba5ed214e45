"""memlong-jax: MemLong (arXiv 2408.16967) in JAX/Flax.

    import memlong_jax as ml
    model = ml.load("path/to/converted")
    model.logits(ids)            # [B, T] int -> [B, T, V]
    model.score(ids, mode="memlong", local_window=2048)   # per-token NLL of the last window
"""

from memlong_jax.api import Model, load
from memlong_jax.llama.config import LlamaConfig
from memlong_jax.presets import PRESETS, get_config

__all__ = ["LlamaConfig", "Model", "PRESETS", "get_config", "load"]
