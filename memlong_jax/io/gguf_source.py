"""GGUF (llama.cpp) LLaMA checkpoints as a tensor source in HF layout.

Quantized tensors are dequantized to fp32 with the `gguf` package (the same routine transformers
uses). llama.cpp stores q/k projections with rows permuted for its RoPE kernel; we undo that.
"""

from __future__ import annotations

import os
import re

import gguf
import numpy as np

from memlong_jax.errors import UserError

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_tensor_name(gguf_name: str) -> str:
    """The HF name of a GGUF tensor; unknown tensors keep their name (and are then reported)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.weight"
    return gguf_name


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation (interleaved pairs -> rotate-half halves) per head."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return (weight.reshape(n_heads, half, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _f32(value: float) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.9999997e-06. Take the shortest decimal
    that rounds to the same float32, which is the value the model was exported with."""
    return float(str(np.float32(value)))


class GGUFSource:
    def __init__(self, path: str):
        self._gguf = gguf
        self.path = path
        try:
            self._reader = gguf.GGUFReader(path)
        except Exception as err:
            raise UserError(f"{path}: not a readable GGUF file ({err})") from None
        self._tensors = {hf_tensor_name(t.name): t for t in self._reader.tensors}
        self.hf_config = self._config()

    def _field(self, key, default=None):
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _config(self) -> dict:
        arch = self._field("general.architecture")
        if arch != "llama":
            raise UserError(f"{self.path}: unsupported architecture {arch!r} (only llama)")
        if self._field(f"{arch}.rope.scaling.type", "none") not in ("none", None):
            raise UserError(f"{self.path}: unsupported RoPE scaling")
        hidden = self._field(f"{arch}.embedding_length")
        heads = self._field(f"{arch}.attention.head_count")
        if not isinstance(heads, int) or not isinstance(hidden, int) or heads <= 0 or hidden <= 0:
            raise UserError(f"{self.path}: {arch}.attention.head_count ({heads!r}) and "
                            f"{arch}.embedding_length ({hidden!r}) must be positive integers")
        tokens = self._field("tokenizer.ggml.tokens") or []
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self._field(f"{arch}.vocab_size", len(tokens)),
            "hidden_size": hidden,
            "intermediate_size": self._field(f"{arch}.feed_forward_length"),
            "num_hidden_layers": self._field(f"{arch}.block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._field(f"{arch}.attention.head_count_kv", heads),
            "head_dim": self._field(f"{arch}.attention.key_length", hidden // heads),
            "rms_norm_eps": _f32(self._field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": _f32(self._field(f"{arch}.rope.freq_base", 10000.0)),
            "max_position_embeddings": self._field(f"{arch}.context_length", 2048),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self._field("tokenizer.ggml.padding_token_id"),
        }

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[name].shape))  # GGUF lists dims inner first

    def read(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        kinds = self._gguf.GGMLQuantizationType
        try:
            if tensor.tensor_type in (kinds.F32, kinds.F16):
                weight = np.array(tensor.data)
            else:
                weight = self._gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as err:
            raise UserError(f"{self.path}: cannot read tensor {tensor.name} ({err})") from None
        if name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_rope_rows(weight, self.hf_config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_rope_rows(weight, self.hf_config["num_key_value_heads"])
        return weight

    def save_tokenizer(self, out_dir: str) -> list[str]:
        """Rebuild an HF tokenizer from the GGUF vocabulary (transformers' own GGUF reader)."""
        from transformers import AutoTokenizer   # heavy (imports torch): only for conversion
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                os.path.dirname(os.path.abspath(self.path)), gguf_file=os.path.basename(self.path))
        except Exception as err:
            raise UserError(f"{self.path}: cannot build a tokenizer from it ({err})") from None
        return list(tokenizer.save_pretrained(out_dir))
