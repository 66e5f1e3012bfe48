"""Batched sampling on the GPU: seeded rows do not depend on their batch, filters hold."""

from __future__ import annotations

import torch

from protos.batch_plan import SamplingOptions
from worker_service.sampler import filtered_probs, sample

DEV = torch.device("cuda")


def test_seeded_rows_ignore_their_neighbours():
    vocab = 50000
    logits = torch.randn(8, vocab, device=DEV)
    seeded = SamplingOptions(temperature=0.9, top_p=0.95, top_k=100, seed=42)
    gen = torch.Generator(device=DEV).manual_seed(0)
    alone = sample(logits[3:4], [seeded], [7], gen).tolist()[0]
    mixed = [SamplingOptions(temperature=1.3) if i != 3 else seeded for i in range(8)]
    in_batch = sample(logits, mixed, [0, 1, 2, 7, 4, 5, 6, 8], gen).tolist()[3]
    assert alone == in_batch


def test_filters_match_definition():
    logits = torch.randn(3, 1000, device=DEV, dtype=torch.float32)
    opts = [SamplingOptions(temperature=0.7, top_k=5), SamplingOptions(temperature=1.0, top_p=0.5),
            SamplingOptions(temperature=2.0)]
    probs = filtered_probs(logits, opts)
    assert (probs[0] > 0).sum().item() == 5
    kept = probs[1] > 0
    full = torch.softmax(logits[1], -1)
    assert full[kept].sum().item() >= 0.5 and full[~kept].max() <= full[kept].min()
    torch.testing.assert_close(probs[2], torch.softmax(logits[2] / 2.0, -1))


def test_sampled_frequencies_follow_probs():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]], device=DEV).clamp_min(1e-30)).repeat(4000, 1)
    gen = torch.Generator(device=DEV).manual_seed(1)
    toks = sample(logits, [SamplingOptions(temperature=1.0)] * 4000, [0] * 4000, gen).tolist()
    freq = torch.bincount(torch.tensor(toks), minlength=4).float() / 4000
    assert abs(freq[0] - 0.5) < 0.04 and abs(freq[1] - 0.3) < 0.04 and freq[3] == 0
