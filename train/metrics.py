"""Metrics: JSONL and TensorBoard scalars, and the frozen-aware FLOP count behind TFLOP/s and MFU.

TensorBoard event files come from tensorboardX (no tensorflow); `tensorboard --logdir OUTPUT/tb`
reads them.
"""

from __future__ import annotations

import json
import math
import os
import sys

from memlong_jax.llama.config import LlamaConfig
from memlong_jax.memlong.config import MemLongConfig

# tensorboardX imports torch when it is installed, only to accept torch tensors (never passed
# here), and that import was most of a training process's start-up time: hide torch from it.
_HIDE_TORCH = "torch" not in sys.modules
if _HIDE_TORCH:
    sys.modules["torch"] = None   # `import torch` raises ImportError, which tensorboardX takes
try:
    from tensorboardX import SummaryWriter
finally:
    if _HIDE_TORCH:
        del sys.modules["torch"]


class MetricsLog:
    """`metrics.jsonl` (one object per logged step, flushed at once) plus TensorBoard (written
    by a background thread: complete once `close` returns, which training does on every exit
    but SIGKILL; the JSONL is the record that survives that too).

    A run resumed at step s passes `purge_step=s + 1`: TensorBoard then hides the scalars the
    interrupted run logged after its last checkpoint, which this run logs again."""

    def __init__(self, directory: str, tensorboard: bool, enabled: bool = True,
                 purge_step: int | None = None):
        self.enabled = enabled
        if not enabled:
            return
        self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")
        self._tb = SummaryWriter(os.path.join(directory, "tb"), filename_suffix=f".{os.getpid()}",
                                 purge_step=purge_step) if tensorboard else None

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self._tb:
            for tag, value in values.items():
                if tag != "time" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(tag, value, step)
            self._tb.flush()

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

    With `prefix_overlap` p, each micro-step runs p * tau context tokens in front of its block
    (every micro-step but the run's very first; counted in all): through every layer as its
    tokens are, gradients included above the memory layer (the block's queries read the
    context's K/V there), and attended to by the block's queries; only the LM head skips them.
    `flops_per_token` is per scored (block) token.
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
    weight_grads = n - (m + 1 if t.train_from < 0 else t.train_from)   # layers that train
    per_run_token = (2 * layer * (m + 1) + 2 * (p["k_proj"] + p["v_proj"])
                     + upper * 4 * layer + weight_grads * 2 * trained)
    s = t.seq_len
    run = s + mcfg.prefix_overlap * mcfg.chunk_size   # context + block, one causal run
    causal_pairs = run * (run + 1) / 2
    mem_pairs = run * mcfg.top_k * mcfg.chunk_size
    pair = 4 * cfg.num_attention_heads * cfg.head_dim
    attn = 0.0
    for i in range(n):
        pairs = causal_pairs + (mem_pairs if i in mcfg.retrieval_layers else 0)
        attn += pair * pairs * (3 if i > m else 1)
    per_block = run * per_run_token + s * 4 * head + attn   # one micro-step of one row
    tokens = s * t.rows_per_replica * t.grad_accum  # per replica
    per_step_lora = 0
    if t.trainable == "lora":
        for x in t.lora_target_list:
            d_in = cfg.num_attention_heads * cfg.head_dim if x == "o_proj" else (
                cfg.intermediate_size if x == "down_proj" else cfg.hidden_size)
            d_out = p[x] // d_in
            per_step_lora += weight_grads * 3 * 2 * d_in * t.lora_rank * d_out
        per_step_lora *= t.grad_accum  # merged again in every micro-step
    total = t.rows_per_replica * t.grad_accum * per_block + per_step_lora
    return {"tokens_per_replica": tokens, "flops_per_token": per_block / s,
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
