"""Turns logits into tokens: batched greedy, and temperature / top-k / top-p sampling.

A seeded request draws its n-th token from a generator seeded by (seed, n), so its tokens do not
depend on what else shares the batch, nor on preemption and recompute.
"""

from __future__ import annotations

import torch

from protos.batch_plan import SamplingOptions

_SEED_MIX = 0x9E3779B97F4A7C15  # spreads (seed, index) pairs over the generator's seed space


def sample(logits: torch.Tensor, options: list[SamplingOptions], output_index: list[int],
           fallback: torch.Generator) -> list[int]:
    """logits: [n, vocab] float32. output_index[i] is how many tokens sequence i generated so far."""
    tokens = torch.argmax(logits, dim=-1)
    random_rows = [i for i, o in enumerate(options) if not o.greedy]
    for i in random_rows:
        o = options[i]
        probs = _filtered_probs(logits[i], o)
        gen = fallback
        if o.seed is not None:
            gen = torch.Generator(device=logits.device)
            gen.manual_seed((o.seed * _SEED_MIX + output_index[i]) % (1 << 63))
        tokens[i] = torch.multinomial(probs, 1, generator=gen)[0]
    return tokens.tolist()


def _filtered_probs(logits: torch.Tensor, o: SamplingOptions) -> torch.Tensor:
    scaled = logits / o.temperature
    if 0 < o.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, o.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if o.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= o.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs
