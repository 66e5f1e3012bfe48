"""Triton kernels for the worker's hot path, each beside the torch reference it is tested against.

Importing a kernel module needs Triton; the references are plain torch and run anywhere.
"""
