"""Encode and decode one layer's keys (or values) in its calibrated spectral basis: the PyTorch reference path.

Write path, per token and KV head: ``z = U^T (x - mu) / sqrt(lambda)`` (rotated, centred, standardised), optionally
divided by a per-token scale ``s = rms(z)`` stored in fp16, then each coordinate is replaced by the index of its
nearest centroid in the codebook of its bit width, and the codes are packed (see :mod:`spectralkv.packing`).
Coordinates are permuted so each bit width is a contiguous byte-aligned range of the row; 0-bit coordinates cost
nothing and decode to the mean. The Triton kernels use exactly this layout and must reproduce these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import codebook as cb
from .packing import pack, packed_bytes, unpack

EIGENVALUE_FLOOR = 1e-10
SCALE_FLOOR = 1e-6


@dataclass(frozen=True)
class Regime:
    """A contiguous run of ``count`` coordinates (in packing order) coded with ``bits`` bits each."""

    bits: int
    start: int
    count: int
    byte_offset: int  # within the head's slice of the row

    @property
    def nbytes(self) -> int:
        return packed_bytes(self.count, self.bits)


class SpectralQuantizer:
    """Quantizer for one layer and one of K/V, all KV heads of that layer.

    Args:
        mean: ``[H, D]`` calibration mean.
        basis: ``[H, D, D]`` orthonormal eigenvectors (columns), eigen order.
        eigenvalues: ``[H, D]`` eigenvalues, eigen order.
        codebooks: ``[8, 256]`` Lloyd-Max centroid table (see :func:`spectralkv.codebook.fit_codebooks`).
        bits: ``[H, D]`` bits per coordinate (eigen order), each bit width used a multiple of 8 times per head.
        token_scale: whether each token carries an fp16 scale.
    """

    def __init__(
        self,
        mean: torch.Tensor,
        basis: torch.Tensor,
        eigenvalues: torch.Tensor,
        codebooks: torch.Tensor,
        bits: torch.Tensor,
        token_scale: bool,
    ) -> None:
        self.num_heads, self.head_dim = mean.shape
        self.token_scale = bool(token_scale)
        self.bits = bits.to(torch.uint8).cpu()
        self.codebooks = codebooks.float()
        perm = torch.argsort(self.bits.long(), dim=-1, descending=True, stable=True)  # [H, D]
        self.perm = perm
        sqrt_lam = eigenvalues.float().clamp_min(EIGENVALUE_FLOOR).sqrt()
        u = torch.gather(basis.float(), 2, perm.unsqueeze(1).expand_as(basis))  # columns in packing order
        s = torch.gather(sqrt_lam, 1, perm)
        self.mean = mean.float()
        self.encoder = u / s.unsqueeze(1)  # [H, D, D]: z = (x - mu) @ encoder
        self.decoder = (u * s.unsqueeze(1)).transpose(1, 2).contiguous()  # [H, D, D]: x = mu + z @ decoder
        self.regimes: list[list[Regime]] = []
        self.head_byte_offsets: list[int] = []
        offset = 0
        for h in range(self.num_heads):
            sorted_bits = torch.gather(self.bits[h].long(), 0, perm[h]).tolist()
            regs, start, hoff = [], 0, 0
            for b in sorted(set(sorted_bits), reverse=True):
                n = sorted_bits.count(b)
                if b > 0:
                    r = Regime(b, start, n, hoff)
                    regs.append(r)
                    hoff += r.nbytes
                start += n
            self.regimes.append(regs)
            self.head_byte_offsets.append(offset)
            offset += hoff
        self.row_bytes = offset
        self._device_cache: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    # -- accounting -------------------------------------------------------------------------------------------
    @property
    def code_bits_per_token(self) -> int:
        return int(self.bits.long().sum())

    @property
    def bits_per_token(self) -> int:
        """Bits stored per token for all heads of this layer: codes plus fp16 scales."""
        return self.code_bits_per_token + (16 * self.num_heads if self.token_scale else 0)

    # -- tensors on the right device (the layer's device, moved lazily) -----------------------------------------
    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._device_cache:
            self._device_cache[device] = tuple(
                t.to(device) for t in (self.mean, self.encoder, self.decoder, self.codebooks)
            )
        return self._device_cache[device]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, T, D]`` -> standardised rotated coordinates in packing order (float32)."""
        mean, enc, _, _ = self._on(x.device)
        return torch.einsum("bhtd,hde->bhte", x.float() - mean[:, None, :], enc)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, H, T, D]`` -> (packed ``[B, T, row_bytes]`` uint8, scales ``[B, T, H]`` fp16 or None)."""
        _, _, _, table = self._on(x.device)
        z = self.rotate(x)
        scales = None
        if self.token_scale:
            scales = z.pow(2).mean(-1).sqrt().clamp_min(SCALE_FLOOR).to(torch.float16)  # [B, H, T]
            z = z / scales.float().unsqueeze(-1)
            scales = scales.transpose(1, 2).contiguous()
        b, _, t, _ = z.shape
        out = torch.empty(b, t, self.row_bytes, dtype=torch.uint8, device=x.device)
        for h in range(self.num_heads):
            base = self.head_byte_offsets[h]
            for r in self.regimes[h]:
                codes = cb.quantize(z[:, h, :, r.start : r.start + r.count], table, r.bits)
                o = base + r.byte_offset
                out[:, :, o : o + r.nbytes] = pack(codes, r.bits)
        return out, scales

    def decode_rotated(self, packed: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """Packed rows -> reconstructed standardised coordinates ``[B, H, T, D]`` (packing order, float32)."""
        _, _, _, table = self._on(packed.device)
        b, t, _ = packed.shape
        z = torch.zeros(b, self.num_heads, t, self.head_dim, dtype=torch.float32, device=packed.device)
        for h in range(self.num_heads):
            base = self.head_byte_offsets[h]
            for r in self.regimes[h]:
                o = base + r.byte_offset
                codes = unpack(packed[:, :, o : o + r.nbytes], r.bits, r.count)
                z[:, h, :, r.start : r.start + r.count] = cb.dequantize(codes, table, r.bits, torch.float32)
        if scales is not None:
            z = z * scales.transpose(1, 2).float().unsqueeze(-1)
        return z

    def decode(self, packed: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Packed rows -> ``[B, H, T, D]`` keys or values in ``dtype``."""
        mean, _, dec, _ = self._on(packed.device)
        z = self.decode_rotated(packed, scales)
        return (torch.einsum("bhte,hed->bhtd", z, dec) + mean[:, None, :]).to(dtype)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """What the cache returns for ``x`` after encode + decode, without the (lossless) packing step.

        Used by calibration, where the same tokens are quantized many times; equal to
        ``decode(*encode(x))`` (the tests check it).
        """
        mean, _, dec, table = self._on(x.device)
        z = self.rotate(x)
        scales = None
        if self.token_scale:
            scales = z.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(SCALE_FLOOR).to(torch.float16).float()
            z = z / scales
        zq = torch.zeros_like(z)
        for h in range(self.num_heads):
            for r in self.regimes[h]:
                sl = slice(r.start, r.start + r.count)
                zq[:, h, :, sl] = cb.dequantize(cb.quantize(z[:, h, :, sl], table, r.bits), table, r.bits, z.dtype)
        if scales is not None:
            zq = zq * scales
        return (torch.einsum("bhte,hed->bhtd", zq, dec) + mean[:, None, :]).to(x.dtype)
