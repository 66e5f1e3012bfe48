"""Tensor parallelism as a transform of a built LlamaModel (gpt-fast style): `shard_model`
replaces each layer's weights, in place, by this rank's shard.

  qkv_proj      column-parallel: this rank's q heads and their k/v heads, re-fused [q; k; v]
  o_proj        row-parallel: this rank's q-head columns, then all_reduce(sum)
  gate_up_proj  column-parallel: this rank's slice of gate and of up, re-fused [gate; up]
  down_proj     row-parallel, then all_reduce(sum)
  embed_tokens  vocab-parallel: rows [lo, hi); other ids give zeros, then all_reduce(sum)
  lm_head       vocab-parallel: logits for [lo, hi), then all_gather: every rank gets them all,
                so every rank samples the same tokens with no extra message

With fewer KV heads than ranks, each KV head is replicated on the ranks whose q heads read it.
Only the two row-parallel sums change arithmetic (partial products summed in another order);
the embedding sum adds zeros and the gather moves bytes, both exact.

`shard_weight` is the one place that slices: `shard_model` applies it to a built model (or to
a skeleton of meta tensors), and the loader applies it to each whole weight as it streams from
the checkpoint, so a rank's peak memory is its shard plus one whole tensor.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from worker_service.models.config import ModelConfig
from worker_service.models.llama import Linear, LlamaModel, linear


@dataclass
class CommStats:
    """Collective traffic of this process, for the handoff benchmark."""

    calls: int = 0
    bytes: int = 0       # payload bytes each rank contributes
    ns: int = 0

    def add(self, t: torch.Tensor, start_ns: int) -> None:
        self.calls += 1
        self.bytes += t.numel() * t.element_size()
        self.ns += time.perf_counter_ns() - start_ns


COMM = CommStats()


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    start = time.perf_counter_ns()
    dist.all_reduce(x, group=group)
    COMM.add(x, start)
    return x


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r @ W_r^T: each rank holds the input columns of its shard."""

    def __init__(self, weight: torch.Tensor, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(linear(x, self.weight), self.group)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor, lo: int, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)   # rows [lo, lo + len)
        self.lo, self.hi = lo, lo + weight.shape[0]
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.lo) & (ids < self.hi)
        out = F.embedding(torch.where(mine, ids - self.lo, 0), self.weight)
        out = out.masked_fill(~mine.unsqueeze(-1), 0.0)
        return all_reduce(out, self.group)


class VocabParallelLMHead(nn.Module):
    def __init__(self, weight: torch.Tensor, shard_rows: int, vocab_size: int,
                 group: dist.ProcessGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.shard_rows = shard_rows     # the widest shard: all_gather wants equal sizes
        self.vocab_size = vocab_size
        self.group = group

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = linear(h, self.weight)
        if local.shape[-1] < self.shard_rows:   # the last shard of an uneven split
            local = F.pad(local, (0, self.shard_rows - local.shape[-1]))
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        start = time.perf_counter_ns()
        dist.all_gather(parts, local, group=self.group)
        COMM.add(local, start)
        return torch.cat(parts, dim=-1)[..., :self.vocab_size]


@dataclass(frozen=True)
class HeadShard:
    """Which heads a rank keeps: q heads [q_lo, q_lo + num_heads), kv heads likewise."""

    q_lo: int
    num_heads: int
    kv_lo: int
    num_kv_heads: int


def head_shard(num_heads: int, num_kv_heads: int, tp_rank: int, tp_size: int) -> HeadShard:
    if num_heads % tp_size:
        raise ValueError(f"{num_heads} attention heads do not split over {tp_size} ranks")
    hq = num_heads // tp_size
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"{num_kv_heads} KV heads do not split over {tp_size} ranks")
        hk = num_kv_heads // tp_size
        return HeadShard(tp_rank * hq, hq, tp_rank * hk, hk)
    if tp_size % num_kv_heads:
        raise ValueError(f"{num_kv_heads} KV heads cannot be replicated evenly over {tp_size} ranks")
    group = num_heads // num_kv_heads          # q heads per KV head
    return HeadShard(tp_rank * hq, hq, (tp_rank * hq) // group, 1)


def shard_weight(name: str, whole: torch.Tensor, config: ModelConfig, tp_rank: int, tp_size: int
                 ) -> torch.Tensor:
    """TP rank `tp_rank`'s piece of the whole weight `name` (our layout; layer numbers do not
    matter). Pieces are fresh tensors, so the whole one can be freed; replicated weights (norms)
    are returned whole."""
    if tp_size == 1:
        return whole
    c = config
    d = c.head_dim
    hs = head_shard(c.num_heads, c.num_kv_heads, tp_rank, tp_size)
    inter = c.intermediate_size // tp_size
    if name.endswith(("attn.qkv_proj.weight", "attn.qkv_proj.bias")):
        q, k, v = whole.split([c.q_size, c.kv_size, c.kv_size], dim=0)
        return torch.cat([q[hs.q_lo * d:(hs.q_lo + hs.num_heads) * d],
                          k[hs.kv_lo * d:(hs.kv_lo + hs.num_kv_heads) * d],
                          v[hs.kv_lo * d:(hs.kv_lo + hs.num_kv_heads) * d]])
    if name.endswith("attn.o_proj.weight"):
        piece = whole[:, hs.q_lo * d:(hs.q_lo + hs.num_heads) * d]
    elif name.endswith("mlp.gate_up_proj.weight"):
        gate, up = whole.chunk(2, dim=0)
        lo = tp_rank * inter
        return torch.cat([gate[lo:lo + inter], up[lo:lo + inter]])
    elif name.endswith("mlp.down_proj.weight"):
        piece = whole[:, tp_rank * inter:(tp_rank + 1) * inter]
    elif name in ("embed_tokens.weight", "lm_head.weight"):
        lo, hi = vocab_rows(c.vocab_size, tp_rank, tp_size)
        piece = whole[lo:hi]
    else:
        return whole
    return piece.clone(memory_format=torch.contiguous_format)


def vocab_rows(vocab_size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """The vocabulary rows [lo, hi) of a rank; every shard but the last is ceil(V / tp) rows."""
    shard_rows = -(-vocab_size // tp_size)
    lo = min(tp_rank * shard_rows, vocab_size)
    return lo, min(lo + shard_rows, vocab_size)


def check_shardable(config: ModelConfig, tp_size: int) -> None:
    """Raises ValueError, saying why, when the model's heads or MLP do not split over tp_size."""
    if config.intermediate_size % tp_size:
        raise ValueError(f"intermediate size {config.intermediate_size} does not split over {tp_size} ranks")
    head_shard(config.num_heads, config.num_kv_heads, 0, tp_size)


def shard_model(model: LlamaModel, tp_rank: int, tp_size: int, group: dist.ProcessGroup | None
                ) -> LlamaModel:
    """Shards `model` in place for TP rank `tp_rank` of `tp_size`; returns it. It works the same
    on a skeleton of meta tensors (what the loader shapes before any weight is read). The
    model's config then gives this rank's local head counts and intermediate size (what the
    runner sizes its KV cache and attention backend by); vocab and hidden sizes stay global."""
    if tp_size == 1:
        return model
    assert group is not None
    c = model.config
    check_shardable(c, tp_size)
    hs = head_shard(c.num_heads, c.num_kv_heads, tp_rank, tp_size)

    def piece(name: str, whole: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(shard_weight(name, whole, c, tp_rank, tp_size), requires_grad=False)

    with torch.no_grad():
        for layer in model.layers:
            attn = layer.attn
            qkv_w, qkv_b = attn.qkv_proj.weight, attn.qkv_proj.bias
            qkv = Linear(c.hidden_size, (hs.num_heads + 2 * hs.num_kv_heads) * c.head_dim,
                         bias=qkv_b is not None, device="meta")
            qkv.weight = piece("attn.qkv_proj.weight", qkv_w)
            if qkv_b is not None:
                qkv.bias = piece("attn.qkv_proj.bias", qkv_b)
            attn.qkv_proj = qkv
            attn.o_proj = RowParallelLinear(piece("attn.o_proj.weight", attn.o_proj.weight).data, group)
            attn.num_heads, attn.num_kv_heads = hs.num_heads, hs.num_kv_heads

            mlp = layer.mlp
            gate_up = Linear(c.hidden_size, 2 * c.intermediate_size // tp_size, bias=False, device="meta")
            gate_up.weight = piece("mlp.gate_up_proj.weight", mlp.gate_up_proj.weight)
            mlp.gate_up_proj = gate_up
            mlp.down_proj = RowParallelLinear(
                piece("mlp.down_proj.weight", mlp.down_proj.weight).data, group)

        lo, hi = vocab_rows(c.vocab_size, tp_rank, tp_size)
        if model.embed_tokens is not None:
            model.embed_tokens = VocabParallelEmbedding(
                piece("embed_tokens.weight", model.embed_tokens.weight).data, lo, group)
        if model.lm_head is not None:
            tied = c.tie_word_embeddings and isinstance(model.embed_tokens, VocabParallelEmbedding)
            head = model.embed_tokens.weight.data if tied else \
                piece("lm_head.weight", model.lm_head.weight).data
            model.lm_head = VocabParallelLMHead(head, -(-c.vocab_size // tp_size), c.vocab_size, group)
            if tied:  # one shard in memory for both
                model.lm_head.weight = model.embed_tokens.weight
    model.config = dataclasses.replace(c, num_heads=hs.num_heads, num_kv_heads=hs.num_kv_heads,
                                       intermediate_size=c.intermediate_size // tp_size)
    for layer in model.layers:
        layer.attn.config = model.config
    return model
