"""Bit packing of codes into uint8 rows.

Layout (shared by the PyTorch path and the Triton kernels): a row is the concatenation of "regimes", one per bit
width in decreasing order; a regime of ``n`` codes of ``b`` bits is an LSB-first bit stream of ``n * b`` bits
(code ``j`` occupies bits ``j*b .. j*b+b-1`` of the stream; bit ``i`` of the stream is bit ``i % 8`` of byte
``i // 8``). Allocation guarantees ``n * b`` is a multiple of 8, so each regime starts on a byte boundary.
"""

from __future__ import annotations

import torch


def packed_bytes(n: int, bits: int) -> int:
    if (n * bits) % 8:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes; allocation groups must be multiples of 8.")
    return n * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., n]`` integer codes in ``[0, 2**bits)`` -> ``[..., n * bits / 8]`` uint8."""
    n = codes.shape[-1]
    nbytes = packed_bytes(n, bits)
    if bits == 8:
        return codes.to(torch.uint8)
    if bits in (1, 2, 4):  # codes never straddle a byte: shift whole groups of 8 // bits codes into each byte
        per = 8 // bits
        grouped = codes.to(torch.int32).reshape(*codes.shape[:-1], nbytes, per)
        shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
        return (grouped << shifts).sum(-1).to(torch.uint8)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    bitstream = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # [..., n, bits]
    bitstream = bitstream.reshape(*codes.shape[:-1], nbytes, 8)
    weights = 1 << torch.arange(8, device=codes.device, dtype=torch.int32)
    return (bitstream * weights).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., n * bits / 8]`` uint8 -> ``[..., n]`` int64 codes."""
    if bits == 8:
        return packed.long()
    nbytes = packed_bytes(n, bits)
    if packed.shape[-1] != nbytes:
        raise ValueError(f"expected {nbytes} packed bytes for {n} codes of {bits} bits, got {packed.shape[-1]}")
    if bits in (1, 2, 4):
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.int32)
        codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*packed.shape[:-1], n).long()
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    bitstream = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # [..., nbytes, 8]
    bitstream = bitstream.reshape(*packed.shape[:-1], n, bits)
    weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (bitstream * weights).sum(-1).long()
