"""Triton kernels for spectralkv (installed as ``spectralkv.kernels``).

Importing this package never imports Triton: the kernel modules do, and are imported only where a kernel runs.

* :mod:`.layout` (PyTorch): per-coordinate tables (bit width, byte, shift) and codebook tables of a quantizer.
* :mod:`.ref` (PyTorch): the references, also the CPU path: ``encode_ref``, ``decode_attention_ref``.
* :mod:`.encode` (Triton): write path, ``spectral_encode`` (op ``spectralkv::encode_packed``).
* :mod:`.decode_attention` (Triton): fused split-K decode attention from packed codes, ``decode_attention``
  (op ``spectralkv::decode_attention_packed``).

:mod:`spectralkv.fused` plugs them into transformers.
"""
