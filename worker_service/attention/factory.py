"""The attention backend by name: `auto` takes torch on a CPU, FlashInfer (else Triton) on a GPU.
Each implementation is imported only when chosen (FlashInfer and Triton need a GPU build)."""

from __future__ import annotations

import torch

from worker_service.attention.backend import AttentionBackend


def make_backend(name: str, device: torch.device, hybrid_attention: str = "separate") -> AttentionBackend:
    """hybrid_attention "pod": hybrid iterations' attention in one POD-Attention launch
    (FlashInfer only)."""
    name = check_backend(name, device, hybrid_attention)
    if name == "torch":
        from worker_service.attention.torch_ref import TorchAttention

        return TorchAttention()
    if name == "flashinfer":
        from worker_service.attention.flashinfer_backend import FlashInferAttention

        backend = FlashInferAttention(device)
        backend.hybrid_pod = hybrid_attention == "pod"
        return backend
    if name == "triton":
        from worker_service.attention.triton_backend import TritonAttention

        return TritonAttention()
    raise ValueError(f"unknown attention backend {name!r}: use auto, torch, flashinfer or triton")


def check_backend(name: str, device: torch.device, hybrid_attention: str = "separate") -> str:
    """The backend `name` resolves to on `device`; ValueError (one line to show) where
    `hybrid_attention` cannot run on it."""
    if name == "auto":
        name = "torch" if device.type == "cpu" else _best_gpu_backend()
    if hybrid_attention != "separate" and name != "flashinfer":
        raise ValueError(f"--hybrid-attention {hybrid_attention} needs the flashinfer attention "
                         f"backend, not {name}: drop it, or pass --attention flashinfer on a GPU")
    return name


def _best_gpu_backend() -> str:
    try:
        import flashinfer  # noqa: F401

        return "flashinfer"
    except ImportError:
        return "triton"
