"""Metrics: JSONL and TensorBoard scalars, and the frozen-aware FLOP count behind TFLOP/s and MFU.

TensorBoard event files are written directly (TFRecord framing with masked CRC32C around
`Event{wall_time, step, summary{value{tag, simple_value}}}` protobufs), so neither tensorflow
nor tensorboard is a dependency; `tensorboard --logdir OUTPUT/tb` reads them.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time

from memlong_jax.llama.config import LlamaConfig
from memlong_jax.memlong.config import MemLongConfig

# ---- CRC32C (Castagnoli), as TFRecord needs -------------------------------------------------

_CRC_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---- minimal protobuf encoding ---------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event_bytes(wall_time: float, step: int, scalars: dict | None = None,
                file_version: str | None = None) -> bytes:
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)          # wall_time: double
    out += _varint(2 << 3 | 0) + _varint(step)                          # step: int64
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())                  # file_version
    if scalars:
        values = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode())              # Value.tag
                         + _varint(2 << 3 | 5) + struct.pack("<f", float(v)))  # simple_value
            for tag, v in scalars.items())
        out += _field_bytes(5, values)                                  # summary
    return out


def record_bytes(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))


class TensorBoardWriter:
    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")
        self._f.write(record_bytes(event_bytes(time.time(), 0, file_version="brain.Event:2")))
        self._f.flush()

    def scalars(self, step: int, values: dict) -> None:
        clean = {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self._f.write(record_bytes(event_bytes(time.time(), step, clean)))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_records(path: str):
    """Yield the payloads of a TFRecord file, checking both CRCs (for tests)."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if crc != masked_crc(header):
            raise ValueError("bad length crc")
        payload = data[pos + 12:pos + 12 + length]
        (crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        if crc != masked_crc(payload):
            raise ValueError("bad data crc")
        yield payload
        pos += 16 + length


class MetricsLog:
    """`metrics.jsonl` (one object per logged step, flushed at once) plus TensorBoard."""

    def __init__(self, directory: str, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")
        self._tb = TensorBoardWriter(os.path.join(directory, "tb")) if tensorboard else None

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self._tb:
            self._tb.scalars(step, {k: v for k, v in values.items() if k != "time"})

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb:
                self._tb.close()


# ---- FLOPs ------------------------------------------------------------------------------------

def layer_params(cfg: LlamaConfig) -> dict:
    d, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim
    return {"q_proj": d * q, "k_proj": d * kv, "v_proj": d * kv, "o_proj": q * d,
            "gate_proj": d * cfg.intermediate_size, "up_proj": d * cfg.intermediate_size,
            "down_proj": cfg.intermediate_size * d}


def step_flops(cfg: LlamaConfig, mcfg: MemLongConfig, t) -> dict:
    """Model FLOPs of one optimizer step as this implementation computes them.

    Per token: layers below and at the memory layer run forward only (2 per weight), plus the
    memory layer's K/V projection done once more for the memory write; the trainable upper
    layers run forward + activation gradient (4 per weight) + weight gradient (2 per weight of
    every trained matrix: LoRA differentiates the merged W + sAB, so its full-size gradient is
    formed, then contracted to A and B); the LM head forward + activation gradient (4 per
    weight). Attention: 4 * heads * head_dim per (query, key) pair forward over the causal
    half and, in retrieval layers, the top_k * tau memory keys; x3 (forward + backward) above
    the memory layer. Plus, per step, the LoRA merges A @ B (forward, and the two backward
    contractions).
    """
    p = layer_params(cfg)
    layer = sum(p.values())
    n, m = cfg.num_hidden_layers, mcfg.memory_layer
    upper = n - 1 - m
    head = cfg.hidden_size * cfg.vocab_size
    if t.trainable == "lora":
        trained = sum(p[x] for x in t.lora_target_list)
    else:
        trained = layer
    per_token = (2 * layer * (m + 1) + 2 * (p["k_proj"] + p["v_proj"])
                 + upper * (4 * layer + 2 * trained) + 4 * head)
    s = t.seq_len
    causal_keys = (s + 1) / 2
    mem_keys = mcfg.top_k * mcfg.chunk_size
    pair = 4 * cfg.num_attention_heads * cfg.head_dim
    attn = 0.0
    for i in range(n):
        keys = causal_keys + (mem_keys if i in mcfg.retrieval_layers else 0)
        attn += pair * keys * (3 if i > m else 1)
    tokens = s * t.rows_per_replica * t.grad_accum  # per replica
    per_step_lora = 0
    if t.trainable == "lora":
        for x in t.lora_target_list:
            d_in = cfg.num_attention_heads * cfg.head_dim if x == "o_proj" else (
                cfg.intermediate_size if x == "down_proj" else cfg.hidden_size)
            d_out = p[x] // d_in
            per_step_lora += upper * 3 * 2 * d_in * t.lora_rank * d_out
        per_step_lora *= t.grad_accum  # merged again in every micro-step
    total = tokens * (per_token + attn) + per_step_lora
    return {"tokens_per_replica": tokens, "flops_per_token": per_token + attn,
            "flops_per_replica_step": total}


PEAK_TFLOPS = {  # dense bf16 tensor-core peaks, per device
    "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "V100": 125.0,
    "RTX 3090": 71.0, "4090": 165.0,
}


def peak_tflops(device_kind: str, configured: float) -> float | None:
    if configured > 0:
        return configured
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in device_kind.lower():
            return value
    return None
