"""MemLong settings: which layer feeds the memory, which layers read it, and how it is managed."""

from __future__ import annotations

import dataclasses

from memlong_jax.llama.config import DTYPES, LlamaConfig
from memlong_jax.memlong.memory import POLICIES
from memlong_jax.memlong.retrieval import BACKENDS
from memlong_jax.settings import Config, ConfigError, check, setting

QUERY_MODES = ("causal", "segment", "chunk")


@dataclasses.dataclass(frozen=True)
class MemLongConfig(Config):
    """Upstream's names for the fields are in brackets. Reading-side settings (prefix_context,
    memory_positions, memory_kv) take upstream's behaviour with their first value (see
    docs/recall_diagnosis.md); speed-only settings (ingest_chunks, host_block_chunks) give the
    same numbers with any value, up to fp32 summation order."""

    memory_layer: int = setting(help="layer whose pre-RoPE K/V are written to memory "
                                     "[mem_layer]")
    retrieval_layers: tuple[int, ...] = setting(
        help="layers whose attention also sees retrieved chunks [ret_attn_layers]")
    chunk_size: int = setting(128, help="tokens per memory chunk, tau [mem_group_size]", least=1)
    top_k: int = setting(8, help="chunks retrieved per segment [ret_group_size]", least=1)
    memory_tokens: int = setting(32768, help="capacity in tokens [memory_size]; a multiple of "
                                             "chunk_size", least=1)
    mem_dtype: str = setting("bfloat16", help="storage dtype of memory K/V", choices=DTYPES)
    eviction: str = setting("paper", help="paper (hit-count policy) or fifo_half (upstream "
                                          "code)", choices=POLICIES)
    retriever: str = setting(
        "text", choices=("text", "hidden"),
        help="text (sentence encoder on decoded chunk text, as the paper) or hidden "
             "(mean-pooled, normalised memory-layer hidden states, no extra model)")
    backend: str = setting(
        "device", choices=BACKENDS,
        help="device (exact top-k in-graph), faiss (exact IndexFlatIP on the host) or "
             "faiss-hnsw (approximate)")
    query_mode: str = setting(
        "causal", choices=QUERY_MODES,
        help="causal (query built only from earlier tokens), segment (upstream: the whole "
             "current segment, which lets chunk choice see the predicted tokens) or chunk (each "
             "tau-chunk of the segment retrieves its own top-k with the embedding of the chunk "
             "before it, which may lie inside the segment)")
    continuation: bool = setting(
        False, help="retrieve top_k - top_k // 2 chunks and add the chunk written right after "
                    "each of the best top_k // 2 (RETRO's neighbour + continuation); off "
                    "upstream")
    previous: bool = setting(
        False, help="each of the best picks also brings the chunk written right before it, so a "
                    "line cut by a chunk boundary is read whole (as block memory's `previous`); "
                    "with continuation too, top_k // 3 picks bring both neighbours; off upstream")
    prefix_context: str = setting(
        "chunk", choices=("chunk", "window"),
        help="chunk: prefix chunks are computed alone (upstream scoring); window: the prefix "
             "runs as segments of the local window, as training writes them")
    prefix_overlap: int = setting(
        0, least=0,
        help="with prefix_context=window: chunks of the previous window segment run in front of "
             "each later one as context, not written again, so the segment's first stored token "
             "is not its attention sink (issue 15); 0: off")
    memory_positions: str = setting(
        "zero", choices=("zero", "true", "near"),
        help="zero: memory keys unrotated (RoPE position 0); true: rotated at their original "
             "positions relative to the queries'; near: the retrieved chunks packed in write "
             "order right before the segment (issue 15)")
    memory_kv: str = setting(
        "shared", choices=("shared", "per_layer"),
        help="shared: every retrieval layer reads the memory layer's K/V; per_layer: each "
             "retrieval layer stores and reads its own (the prefix then runs through the layers "
             "up to the last retrieval layer)")
    ingest_chunks: int = setting(16, help="prefix chunks run through the frozen stack as one "
                                          "batch (ingest_prefix); speed only", least=1)
    host_block_chunks: int = setting(
        64, least=1, help="chunks of a long prefix fed from the host per jitted call (scoring, "
                          "recall; whole local windows with prefix_context=window): text "
                          "embeddings made block by block, host memory flat however long the "
                          "window; speed only")

    @property
    def capacity_chunks(self) -> int:
        return self.memory_tokens // self.chunk_size

    @property
    def kv_layers(self) -> tuple[int, ...]:
        """The layers whose K/V the memory stores, in storage order (concatenated along the
        head dimension with `memory_kv=per_layer`)."""
        return tuple(sorted(self.retrieval_layers)) if self.memory_kv == "per_layer" \
            else (self.memory_layer,)

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

    def validate(self, model: LlamaConfig) -> "MemLongConfig":
        """Raise `ConfigError` naming the first bad field; return self when all is well."""
        n = model.num_hidden_layers
        check(self)
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
        if self.prefix_overlap and self.prefix_context != "window":
            raise ConfigError("prefix_overlap needs prefix_context=window")
        if self.memory_tokens % self.chunk_size:
            raise ConfigError(f"memory_tokens ({self.memory_tokens}) must be a multiple of "
                              f"chunk_size ({self.chunk_size})")
        if self.capacity_chunks < self.top_k:
            raise ConfigError(f"memory_tokens ({self.memory_tokens}) must hold at least top_k "
                              f"({self.top_k}) chunks of {self.chunk_size} tokens")
        return self

