"""A linear model of one iteration's time, for dynamic chunking.

    time_ms = fixed_ms + ms_per_token * (prefill tokens + decode tokens)
                       + ms_per_context_token * (KV tokens the decodes read)

Prefill and decode tokens both pass through every linear layer (the matmul cost per token);
decodes also read their whole context from the KV cache, which is what makes many long decodes
expensive even though each computes one token. Prefill attention to its own context is folded
into ms_per_token: with chunks of a few hundred tokens it is a small share.

The defaults are rough figures for an 8B model in bf16 on one H100 (weights read once per
iteration ~5 ms; ~0.03 ms per token of matmuls; 128 KiB of KV per token read at ~3 TB/s); fit
them to the benchmark's per-iteration trace for another model or device.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IterationCostModel:
    fixed_ms: float = 5.0
    ms_per_token: float = 0.03
    ms_per_context_token: float = 0.00004

    def time_ms(self, num_tokens: int, num_context_tokens: int) -> float:
        return (self.fixed_ms + self.ms_per_token * num_tokens
                + self.ms_per_context_token * num_context_tokens)

    def tokens_within(self, target_ms: float, num_tokens: int, num_context_tokens: int) -> int:
        """How many more tokens fit an iteration that already holds num_tokens tokens reading
        num_context_tokens of KV, without passing target_ms."""
        spare = target_ms - self.time_ms(num_tokens, num_context_tokens)
        return max(0, int(spare / self.ms_per_token))
