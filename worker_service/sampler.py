"""Turns logits into tokens for the whole batch at once: greedy, temperature, top-k, top-p.

Every row is sampled by the exponential race (argmax of probs / E with E ~ Exp(1)), which draws
from probs exactly and needs no host sync at all: the tokens stay on the device, where the next
step can read them before the host has seen them.
A seeded request draws its n-th token's noise from a generator seeded by (seed, n), so its
tokens do not depend on what else shares the batch, nor on preemption and recompute.
"""

from __future__ import annotations

import torch

from protos.batch_plan import SamplingOptions
from worker_service.upload import upload

_SEED_MIX = 0x9E3779B97F4A7C15  # spreads (seed, index) pairs over the generator's seed space


def sample(logits: torch.Tensor, options: list[SamplingOptions], output_index: list[int],
           fallback: torch.Generator) -> torch.Tensor:
    """logits: [n, vocab] float32 -> [n] int64 tokens on the same device.
    output_index[i] is how many tokens sequence i generated so far."""
    tokens = torch.argmax(logits, dim=-1)
    random_rows = [i for i, o in enumerate(options) if not o.greedy]
    if random_rows:
        rows = upload(random_rows, torch.int64, logits.device)
        picked = _sample_rows(logits[rows], [options[i] for i in random_rows],
                              [output_index[i] for i in random_rows], fallback)
        tokens[rows] = picked
    return tokens


def _sample_rows(logits: torch.Tensor, options: list[SamplingOptions], output_index: list[int],
                 fallback: torch.Generator) -> torch.Tensor:
    probs = filtered_probs(logits, options)
    noise = torch.empty_like(probs)
    seeded = [i for i, o in enumerate(options) if o.seed is not None]
    if len(seeded) < len(options):
        noise.exponential_(generator=fallback)
    for i in seeded:
        gen = torch.Generator(device=logits.device)
        gen.manual_seed((options[i].seed * _SEED_MIX + output_index[i]) % (1 << 63))
        noise[i].exponential_(generator=gen)
    return torch.argmax(probs / noise, dim=-1)


def filtered_probs(logits: torch.Tensor, options: list[SamplingOptions]) -> torch.Tensor:
    """Per-row temperature, then top-k (ties at the k-th value kept), then top-p (the smallest
    prefix whose mass reaches top_p, always at least one token). [n, vocab] -> probabilities."""
    n, vocab = logits.shape
    dev = logits.device

    def column(values: list[float]) -> torch.Tensor:
        return upload(values, torch.float32, dev).unsqueeze(1)

    scaled = logits / column([o.temperature for o in options])
    needs_k = [0 < o.top_k < vocab for o in options]
    needs_p = [o.top_p < 1.0 for o in options]
    if not any(needs_k) and not any(needs_p):
        return torch.softmax(scaled, dim=-1)
    sorted_vals, order = torch.sort(scaled, dim=-1, descending=True)
    if any(needs_k):
        k = [o.top_k if nk else vocab for o, nk in zip(options, needs_k, strict=True)]
        kth_index = upload(k, torch.int64, dev).unsqueeze(1) - 1
        kth = sorted_vals.gather(1, kth_index)
        sorted_vals = sorted_vals.masked_fill(sorted_vals < kth, float("-inf"))
    sorted_probs = torch.softmax(sorted_vals, dim=-1)
    if any(needs_p):
        top_p = column([o.top_p if np_ else 2.0 for o, np_ in zip(options, needs_p, strict=True)])
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(sorted_probs).scatter(-1, order, sorted_probs)
