"""train.metrics.step_flops against a hand count for a tiny model, with and without the
`prefix_overlap` context that runs in front of every micro-step's block."""

import types

import pytest

from memlong_jax.llama.config import LlamaConfig
from memlong_jax.memlong.config import MemLongConfig
from train import metrics

# 3 layers, hidden 8, 2 query heads and 1 K/V head of 4, MLP 12, vocabulary 10. Per layer:
# q 8x8 = 64, k 8x4 = 32, v 32, o 64, gate/up/down 96 each: 480 weights.
CFG = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=4)
# Memory layer 0 (frozen, forward only); layers 1 and 2 train LoRA on q and v and read 2 chunks
# of 2 tokens from memory.
MCFG = MemLongConfig(memory_layer=0, retrieval_layers=(1, 2), chunk_size=2, top_k=2,
                     memory_tokens=8)
T = types.SimpleNamespace(seq_len=4, rows_per_replica=3, grad_accum=2, trainable="lora",
                          lora_target_list=("q_proj", "v_proj"), lora_rank=1, train_from=-1)


def hand_count(run: int, block: int = 4) -> int:
    """FLOPs of one micro-step of one row: `run` tokens through the layers (context + block),
    the `block` tokens also through the LM head."""
    layer0 = run * (2 * 480 + 2 * (32 + 32))            # forward + the memory write's K/V again
    upper = run * (4 * 480 + 2 * (64 + 32))             # fwd + activation grad + q/v weight grads
    causal = run * (run + 1) // 2                       # query j sees keys 0..j
    attn0 = 4 * 2 * 4 * causal                          # 4 * heads * head_dim per pair
    attn_upper = 3 * 4 * 2 * 4 * (causal + run * 2 * 2)   # + top_k * tau memory keys, fwd + bwd
    head = block * 4 * 8 * 10                           # forward + activation grad
    return layer0 + 2 * upper + attn0 + 2 * attn_upper + head


# LoRA merges A @ B (forward and two backward products of 2 * in * rank * out), in each of the
# 2 micro-steps, for each of the 2 upper layers: q (8 -> 8) and v (8 -> 4).
MERGES = 2 * 2 * (3 * 2 * 8 * 8 + 3 * 2 * 8 * 4)


@pytest.mark.parametrize("overlap", [0, 1, 2])
def test_step_flops_counts_the_context_in_front_of_each_block(overlap):
    got = metrics.step_flops(CFG, MCFG.replace(prefix_overlap=overlap,
                                               prefix_context="window"), T)
    micro = hand_count(4 + 2 * overlap)
    assert got["tokens_per_replica"] == 4 * 3 * 2
    assert got["flops_per_replica_step"] == pytest.approx(3 * 2 * micro + MERGES, rel=1e-12)
    assert got["flops_per_token"] == pytest.approx(micro / 4, rel=1e-12)
