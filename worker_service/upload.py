"""Host lists to device tensors without waiting for the device.

A copy from pageable host memory may make the host wait until the stream drains, which would
undo the worker's overlap (preparing step i+1 while the GPU runs step i). Staging through
pinned memory keeps every upload asynchronous; PyTorch's pinned-memory cache reuses a buffer
only once the copies that read it have finished.
"""

from __future__ import annotations

import torch


def pinned_tensor(values, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor for a library that copies it to the device itself (FlashInfer's plan): pinned
    so that its copy, too, never waits for the stream."""
    return torch.tensor(values, dtype=dtype, pin_memory=True)


def upload(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list, nested lists, or a CPU tensor) as a tensor of `dtype` on `device`."""
    if device.type != "cuda":
        return torch.as_tensor(values, dtype=dtype, device=device)
    if isinstance(values, torch.Tensor):
        host = values.to(dtype).pin_memory()
    else:
        host = torch.tensor(values, dtype=dtype, pin_memory=True)
    return host.to(device, non_blocking=True)
