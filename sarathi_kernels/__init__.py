"""Triton kernels for the worker's hot path. They take tensors, never worker types, so nothing
here imports a service. Each is tested against a torch reference: its own, beside it, or for
paged attention the worker's torch backend (tests/gpu/test_kernels_gpu.py).

Importing a kernel module needs Triton; the references are plain torch and run anywhere.
"""
