"""The attention backend by name: `auto` takes torch on a CPU, FlashInfer (else Triton) on a GPU.
Each implementation is imported only when chosen (FlashInfer and Triton need a GPU build)."""

from __future__ import annotations

import torch

from worker_service.attention.backend import AttentionBackend


def make_backend(name: str, device: torch.device) -> AttentionBackend:
    if name == "auto":
        name = "torch" if device.type == "cpu" else _best_gpu_backend()
    if name == "torch":
        from worker_service.attention.torch_ref import TorchAttention

        return TorchAttention()
    if name == "flashinfer":
        from worker_service.attention.flashinfer_backend import FlashInferAttention

        return FlashInferAttention(device)
    if name == "triton":
        from worker_service.attention.triton_backend import TritonAttention

        return TritonAttention()
    raise ValueError(f"unknown attention backend {name!r}: use auto, torch, flashinfer or triton")


def _best_gpu_backend() -> str:
    try:
        import flashinfer  # noqa: F401

        return "flashinfer"
    except ImportError:
        return "triton"
