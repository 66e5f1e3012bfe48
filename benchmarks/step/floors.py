"""What kernel-by-kernel execution cannot beat, for a model shape: FLOPs at the matmul rate plus
the bytes read at the copy bandwidth. Plain arithmetic on a ModelConfig (no torch), shared by the
step benchmarks and the workload ceilings of benchmarks/peer/ceiling.py."""

from __future__ import annotations


def kv_bytes(config, tokens: int, elem: int = 2) -> int:
    return tokens * config.num_layers * 2 * config.num_kv_heads * config.head_dim * elem


def matmul_params(config) -> int:
    c = config
    per_layer = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size \
        + 3 * c.hidden_size * c.intermediate_size
    return per_layer * c.num_layers


def lm_head_flops(config, rows: int) -> float:
    return 2 * config.hidden_size * config.vocab_size * rows


def attention_flops(config, query_tokens_times_context: float) -> float:
    """QK^T and PV of every head: 4 x head_dim FLOPs per (query token, key) pair per layer."""
    c = config
    return 4 * c.num_layers * c.num_heads * c.head_dim * query_tokens_times_context


def prefill_flops(config, tokens: int) -> float:
    return 2 * matmul_params(config) * tokens + attention_flops(config, tokens * (tokens + 1) / 2) \
        + lm_head_flops(config, 1)


def hybrid_attention_flops(config, chunk: int, decodes: int, context: int) -> float:
    return attention_flops(config, chunk * (chunk + 1) / 2 + decodes * context)


def hybrid_flops(config, chunk: int, decodes: int, context: int) -> float:
    """A fresh prompt's first chunk (causal over itself) plus decodes at `context`: projections
    of every token, attention of both, and the LM head of the rows that sample (the decodes)."""
    return 2 * matmul_params(config) * (chunk + decodes) \
        + hybrid_attention_flops(config, chunk, decodes, context) + lm_head_flops(config, decodes)


def hybrid_floor(config, chunk: int, decodes: int, context: int, matmul_rate: float,
                 copy_bw: float) -> float:
    """The FLOPs at the matmul rate, then the KV the decodes read at the copy bandwidth (weights
    are read once, under the matmuls)."""
    return hybrid_flops(config, chunk, decodes, context) / matmul_rate \
        + kv_bytes(config, decodes * context) / copy_bw
