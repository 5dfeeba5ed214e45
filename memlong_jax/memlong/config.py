"""MemLong settings: which layer feeds the memory, which layers read it, and how it is managed."""

from __future__ import annotations

import dataclasses
import json
import os

from memlong_jax.llama.config import PRESETS, ConfigError, LlamaConfig, apply_overrides
from memlong_jax.memlong.memory import POLICIES
from memlong_jax.memlong.retrieval import BACKENDS

# The allowed values of each choice field; eviction policies and backends are defined where
# they are implemented.
CHOICES = {
    "mem_dtype": ("bfloat16", "float16", "float32"),
    "eviction": POLICIES,
    "retriever": ("text", "hidden"),
    "backend": tuple(BACKENDS),
    "query_mode": ("causal", "segment", "chunk"),
    "prefix_context": ("chunk", "window"),
    "memory_positions": ("zero", "true", "near"),
    "memory_kv": ("shared", "per_layer"),
}


@dataclasses.dataclass(frozen=True)
class MemLongConfig:
    """Upstream's names for the fields are in brackets.

    memory_layer      layer whose pre-RoPE K/V are written to memory [mem_layer]
    retrieval_layers  layers whose attention also sees retrieved chunks [ret_attn_layers]
    chunk_size        tokens per memory chunk, tau [mem_group_size]
    top_k             chunks retrieved per segment [ret_group_size]
    memory_tokens     capacity in tokens [memory_size]; a multiple of chunk_size
    mem_dtype         storage dtype of memory K/V
    eviction          `paper` (hit-count policy, the default) or `fifo_half` (upstream code)
    retriever         `text` (sentence encoder on decoded chunk text, as the paper) or `hidden`
                      (mean-pooled, normalised memory-layer hidden states, no extra model)
    backend           `device` (exact top-k in-graph), `faiss` (exact IndexFlatIP on the host)
                      or `faiss-hnsw` (approximate)
    query_mode        `causal` (query built only from earlier tokens), `segment` (upstream: the
                      whole current segment, which lets chunk choice see the predicted tokens) or
                      `chunk` (each tau-chunk of the segment retrieves its own top-k with the
                      embedding of the chunk before it, which may lie inside the segment)
    continuation      retrieve top_k - top_k // 2 chunks and add the chunk written right after
                      each of the best top_k // 2 (RETRO's neighbour + continuation); off upstream
    Reading-side settings (upstream: the first value of each; see docs/recall_diagnosis.md):
    prefix_context    `chunk`: prefix chunks are computed alone (upstream scoring) or `window`:
                      the prefix runs as segments of the local window, as training writes them
    memory_positions  `zero`: memory keys unrotated (RoPE position 0), `true`: rotated at
                      their original positions relative to the queries', or `near`: the
                      retrieved chunks packed in write order right before the segment (distant
                      text read as if it were just before the local window; issue 15)
    memory_kv         `shared`: every retrieval layer reads the memory layer's K/V or
                      `per_layer`: each retrieval layer stores and reads its own (the prefix
                      then runs through the layers up to the last retrieval layer)
    Speed only (any value gives the same numbers up to fp32 summation order):
    ingest_chunks     prefix chunks run through the frozen stack as one batch (`ingest_prefix`)
    host_block_chunks chunks of a long prefix fed from the host per jitted call (scoring,
                      recall): text embeddings made block by block, progress visible, host
                      memory flat however long the window
    """

    memory_layer: int
    retrieval_layers: tuple[int, ...]
    chunk_size: int = 128
    top_k: int = 8
    memory_tokens: int = 32768
    mem_dtype: str = "bfloat16"
    eviction: str = "paper"
    retriever: str = "text"
    backend: str = "device"
    query_mode: str = "causal"
    continuation: bool = False
    prefix_context: str = "chunk"
    memory_positions: str = "zero"
    memory_kv: str = "shared"
    ingest_chunks: int = 16
    host_block_chunks: int = 64

    @property
    def capacity_chunks(self) -> int:
        return self.memory_tokens // self.chunk_size

    @property
    def kv_layers(self) -> tuple[int, ...]:
        """The layers whose K/V the memory stores, in storage order (concatenated along the
        head dimension with `memory_kv=per_layer`)."""
        return tuple(sorted(self.retrieval_layers)) if self.memory_kv == "per_layer" \
            else (self.memory_layer,)

    def replace(self, **changes) -> "MemLongConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["retrieval_layers"] = list(self.retrieval_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "MemLongConfig":
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown MemLong setting(s): {', '.join(unknown)}")
        data = dict(data)
        if "retrieval_layers" in data:
            data["retrieval_layers"] = tuple(data["retrieval_layers"])
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"incomplete MemLong settings: {err}") from None

    def with_overrides(self, assignments) -> "MemLongConfig":
        """Apply `key=value` strings (`retrieval_layers=13,17,21`); see `apply_overrides`."""
        return apply_overrides(self, assignments, "MemLong")

    def validate(self, model: LlamaConfig) -> "MemLongConfig":
        """Raise `ConfigError` naming the first bad field; return self when all is well."""
        n = model.num_hidden_layers
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        for name in ("chunk_size", "top_k", "memory_tokens", "ingest_chunks",
                     "host_block_chunks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.memory_layer < n:
            raise ConfigError(f"memory_layer must be in 0..{n - 1}, got {self.memory_layer}")
        if not self.retrieval_layers:
            raise ConfigError("retrieval_layers must name at least one layer")
        for layer in self.retrieval_layers:
            if not self.memory_layer <= layer < n:
                raise ConfigError(f"retrieval_layers must lie in {self.memory_layer}..{n - 1} "
                                  f"(memory_layer..last layer), got {layer}")
        if len(set(self.retrieval_layers)) != len(self.retrieval_layers):
            raise ConfigError(f"retrieval_layers has duplicates: {list(self.retrieval_layers)}")
        if self.memory_tokens % self.chunk_size:
            raise ConfigError(f"memory_tokens ({self.memory_tokens}) must be a multiple of "
                              f"chunk_size ({self.chunk_size})")
        if self.capacity_chunks < self.top_k:
            raise ConfigError(f"memory_tokens ({self.memory_tokens}) must hold at least top_k "
                              f"({self.top_k}) chunks of {self.chunk_size} tokens")
        return self


MEMLONG_PRESETS: dict[str, MemLongConfig] = {
    # Upstream's released stage-2 run and LM eval.
    "openllama3b": MemLongConfig(memory_layer=13, retrieval_layers=(13, 17, 21, 25)),
    # Same recipe on SmolLM2's 30 layers: memory at the middle, every 4th layer above reads it.
    "smollm2-135m": MemLongConfig(memory_layer=15, retrieval_layers=(15, 19, 23, 27)),
    # For tests: 4 layers, 4-token chunks, 8 slots, exact fp32 memory.
    "tiny": MemLongConfig(memory_layer=1, retrieval_layers=(1, 3), chunk_size=4, top_k=2,
                          memory_tokens=32, mem_dtype="float32", retriever="hidden"),
}


def default_for(model: LlamaConfig) -> MemLongConfig:
    """The preset of a model with a known shape, else the same recipe scaled to its depth:
    memory at the middle layer, every 4th layer from there reads memory."""
    for name, preset in PRESETS.items():
        if preset == model and name in MEMLONG_PRESETS:
            return MEMLONG_PRESETS[name]
    middle = model.num_hidden_layers // 2
    return MemLongConfig(memory_layer=middle,
                         retrieval_layers=tuple(range(middle, model.num_hidden_layers, 4)))


def load_for_checkpoint(directory: str, model: LlamaConfig) -> MemLongConfig:
    """The MemLong settings a checkpoint was trained with (`config.json` -> `memlong_jax` ->
    `memlong`), or `default_for(model)` when it has none (a plain converted LLaMA)."""
    path = os.path.join(directory, "config.json")
    stored = None
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f).get("memlong_jax", {}).get("memlong")
    mcfg = MemLongConfig.from_dict(stored) if stored else default_for(model)
    return mcfg.validate(model)
