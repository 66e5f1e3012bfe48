"""Attention backends behind one interface: `torch` (reference, CPU) and GPU backends."""

from worker_service.attention.backend import AttentionBackend, AttentionMetadata, make_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "make_backend"]
