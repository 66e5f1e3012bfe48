"""The worker's memory arithmetic, each quantity defined once: bytes of weights and of a KV
block, free memory, and the share of it the KV cache may take (what Describe offers the
scheduler). The runners gather the inputs (a trial forward, a rank's shape); the sums are here.
"""

from __future__ import annotations

import torch
from torch import nn

from worker_service.models.config import ModelConfig

LOGIT_ROWS = 256               # rows a step samples where the scheduler does not say (Describe)
WORKSPACE_BYTES = 256 << 20    # attention workspaces beside a rank's estimated activations
GRAPH_SLACK_BYTES = 256 << 20  # beside the CUDA graphs' own estimate


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                   dtype: torch.dtype) -> int:
    """K and V of block_size tokens in every layer (the cache layout of attention/backend.py)."""
    return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize


def free_memory_bytes(device: torch.device) -> int:
    """Free device memory, or on the CPU the RAM the kernel says is available (MemAvailable:
    free plus reclaimable caches)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def host_kv_budget(fraction: float) -> int:
    """On the CPU the KV cache may take `fraction` of available RAM: activations are small
    beside it, so there is nothing to profile."""
    return int(free_memory_bytes(torch.device("cpu")) * fraction)


def device_kv_budget(device: torch.device, fraction: float, torch_bytes: int, graph_room: int) -> int:
    """On a GPU: `fraction` of its memory, less what torch will hold besides the cache at the
    worst moment (weights and peak activations), what lives outside torch (CUDA context, NCCL
    buffers) and the room the CUDA graphs will take."""
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = total - free - torch.cuda.memory_reserved(device)
    return max(0, int(total * fraction - torch_bytes - outside_torch - graph_room))


def worst_case_tokens(config: ModelConfig, max_num_tokens: int) -> int:
    """Tokens of the largest iteration: the scheduler's budget, at most one whole context."""
    return max(1, min(max_num_tokens, config.max_model_len))


def sampled_rows(max_num_tokens: int, max_num_seqs: int) -> int:
    """The most rows one step samples: one per sequence (0 sequences: not said, LOGIT_ROWS),
    never more than the step's tokens."""
    return max(1, min(max_num_seqs or LOGIT_ROWS, max_num_tokens))


def activation_bytes_estimate(config: ModelConfig, dtype: torch.dtype, tokens: int, samples: bool,
                              rows: int = LOGIT_ROWS) -> int:
    """Peak activations of an iteration of `tokens`, from the shapes alone (for a rank, which
    cannot run a trial forward by itself). Per token: hidden, residual and norm output, q/k/v
    and attention output, gate/up and the activation; logits (float32, local and gathered) for
    `rows` sampled rows where this model samples."""
    width = 4 * config.hidden_size + 3 * (config.num_heads + 2 * config.num_kv_heads) * config.head_dim \
        + 3 * config.intermediate_size
    logits = 3 * rows * config.vocab_size * 4 if samples else 0
    return tokens * width * dtype.itemsize + logits + WORKSPACE_BYTES


def graph_room_bytes(config: ModelConfig, batch_sizes: tuple[int, ...], hybrid: bool, peak: int) -> int:
    """Memory CUDA graphs hold, given one iteration's peak activations: each decode graph keeps
    its own logits while their activations share a pool; hybrid graphs' pool holds one largest
    step's activations."""
    room = sum(batch_sizes) * (4 * config.vocab_size + 16 * (config.hidden_size + config.intermediate_size))
    if hybrid:
        room += peak
    return room + GRAPH_SLACK_BYTES


def replica_kv_budget(rank_budgets: list[int], rank_bytes_per_token: list[int]) -> int:
    """A replica's KV bytes, in units of its largest rank's bytes per token (Describe divides
    them by the largest rank's block): the most tokens that fit on the tightest rank."""
    tokens = min(b // t for b, t in zip(rank_budgets, rank_bytes_per_token, strict=True))
    return tokens * max(rank_bytes_per_token)


# Pinned-host block sizes that uploads use (PyTorch's pinned cache keeps one free list per power
# of two): per size class, how many blocks to hold ready. An upload's block stays busy until
# its copy has run, i.e. behind the step before on the stream, so small classes need many.
PINNED_CLASSES = tuple((1 << k, 32 if k <= 16 else 8 if k <= 21 else 2) for k in range(3, 25))
SMALL_POOL_BYTES = 256 << 20   # PyTorch's allocations of up to 1 MiB come from 2 MiB segments
RESERVE_SLACK_BYTES = 1 << 30  # what the eager reserve leaves free on the device


def warm_allocators(device: torch.device, reserve_bytes: int) -> None:
    """Grows PyTorch's device and pinned-host caches now, while nothing is queued, to what
    serving will ask of them: cudaMalloc and cudaHostAlloc wait for the whole device, so a cache
    growing mid-serving (a batch larger than any before: bigger logits, block tables) stalls
    the host for the iteration in flight, and every stream misses a token's turn. Freed
    blocks stay cached: later allocations are carved out of them."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    reserve = min(reserve_bytes, free - RESERVE_SLACK_BYTES)
    if reserve > 0:   # one large segment, split by later large allocations
        torch.empty(reserve, dtype=torch.uint8, device=device)  # freed at once, kept cached
    mib = 1 << 20
    small = [torch.empty(mib, dtype=torch.uint8, device=device) for _ in range(SMALL_POOL_BYTES // mib)]
    del small
    pinned = [torch.empty(size, dtype=torch.uint8, pin_memory=True)
              for size, count in PINNED_CLASSES for _ in range(count)]
    del pinned
