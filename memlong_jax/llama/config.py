"""LLaMA architecture config and HF `config.json` in and out (named presets: `memlong_jax.presets`).

The dataclass holds only what changes the parameter shapes or the forward math; compute and
storage dtypes are arguments of the model, not of the architecture.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import ml_dtypes
import numpy as np

from memlong_jax.settings import Config, ConfigError, check, setting

# Every dtype a setting or flag may name (compute, parameter, storage), by name.
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}

MAX_DIM = 2**31 - 1  # int32 indexing; anything larger is a typo (vocab_size 1e12)
# How causal self-attention runs (`LlamaConfig.attention_kernel`; `attention.causal_kernel`).
ATTENTION_KERNELS = ("auto", "dense", "blockwise", "fused")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(Config):
    vocab_size: int = setting(help="tokens in the vocabulary", least=1)
    hidden_size: int = setting(help="width of the residual stream", least=1)
    intermediate_size: int = setting(help="width of the SwiGLU MLP", least=1)
    num_hidden_layers: int = setting(help="decoder layers", least=1)
    num_attention_heads: int = setting(help="query heads", least=1)
    num_key_value_heads: int = setting(help="key/value heads (grouped-query attention)",
                                       least=1)
    head_dim: int = setting(help="width of one head (even, for rotate-half RoPE)", least=1)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = setting(2048, help="trained context length", least=1)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # Runtime choices, not architecture (never in config.json).
    blockwise_min_length: int = setting(
        0, help="causal attention over at least this many tokens runs blockwise (0: the "
                "backend's default, attention.BLOCKWISE)", least=0)
    blockwise_block: int = setting(
        0, help="tile size of blockwise attention (0: the backend's default)", least=0)
    attention_kernel: str = setting(
        "auto", choices=ATTENTION_KERNELS,
        help="causal self-attention: dense (explicit [T, T] mask), blockwise (online-softmax "
             "tiles), fused (jax.nn.dot_product_attention: cuDNN flash attention on a GPU, "
             "bfloat16/float16 only; XLA elsewhere) or auto (dense below blockwise_min_length, "
             "blockwise from it)")
    attention_head_multiple: int = setting(
        8, help="fused attention zero-pads head_dim (plus 2 dims when memory is read) up to a "
                "multiple of this (cuDNN takes multiples of 8)", least=1)

    def __post_init__(self):
        check(self)
        for field in dataclasses.fields(self):
            if field.metadata.get("least") == 1 and getattr(self, field.name) > MAX_DIM:
                raise ConfigError(f"{field.name} {getattr(self, field.name)} is beyond any "
                                  f"buildable model (at most {MAX_DIM})")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, float) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")

    # ---- HF config.json -------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Build from a transformers `LlamaConfig` dict; anything we would compute wrongly is an error."""
        if not isinstance(hf, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        if not isinstance(archs, list):
            archs = [archs]
        if model_type != "llama" or any(a != "LlamaForCausalLM" for a in archs):
            raise ConfigError(
                f"unsupported architecture (model_type={model_type!r}, architectures={archs}); "
                "only LLaMA (LlamaForCausalLM) checkpoints are supported")
        if hf.get("rope_scaling"):
            raise ConfigError(f"unsupported rope_scaling {hf['rope_scaling']!r}; only plain RoPE")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConfigError(f"unsupported {flag}=true; LLaMA projections have no bias here")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r}; only silu")
        try:
            heads = hf["num_attention_heads"]
            hidden = hf["hidden_size"]
            rope_theta = hf.get("rope_theta")
            if rope_theta is None:  # transformers 5 nests it under rope_parameters
                rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hidden,
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or _divide(hidden, heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
            )
        except KeyError as err:
            raise ConfigError(f"config.json lacks required field {err.args[0]!r}") from None
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(f"config.json has a value of the wrong type ({err})") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers `LlamaConfig` fields that reproduce this model exactly."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "attention_bias": False,
            "mlp_bias": False,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LlamaConfig":
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: not readable JSON ({err})") from None
        return cls.from_hf_dict(data)


def _divide(hidden, heads) -> int:
    """head_dim when config.json leaves it out: hidden_size / num_attention_heads."""
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
        raise ConfigError(f"num_attention_heads ({heads!r}) and hidden_size ({hidden!r}) must "
                          "be positive integers")
    return hidden // heads

