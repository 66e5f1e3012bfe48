"""Attention backends behind one interface: `torch` (reference, CPU) and GPU backends."""

from worker_service.attention.backend import AttentionBackend, AttentionMetadata
from worker_service.attention.factory import make_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "make_backend"]
