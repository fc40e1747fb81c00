"""Triton kernels of fastattn, installed as fastattn.triton_kernels (one file per op family)."""
