"""Triton kernels, one per file with its launcher. Import them lazily (see kernels/backends.py)."""
