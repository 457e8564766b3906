"""Triton kernels for spectralkv (installed as ``spectralkv.kernels``).

Importing this package never imports Triton: each kernel module does that lazily, so CPU-only
machines can import spectralkv without a working Triton.
"""
