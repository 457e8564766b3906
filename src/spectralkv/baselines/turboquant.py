"""TurboQuant-style baseline: random rotation, per-token norm, Gaussian Lloyd-Max codes per coordinate.

Zandieh et al., "TurboQuant: Online Vector Quantization with Near-optimal Distortion Rate", 2025
(https://arxiv.org/abs/2504.19874). This is the MSE-optimal stage of the paper ("TurboQuant_mse"), which production
implementations use on its own: the 1-bit QJL residual stage is left out.

Per token and KV head: store the norm ``||x||`` in fp16, rotate the unit vector by a fixed seeded random orthogonal
matrix ``R`` (one per layer and K/V, shared by heads), scale by ``sqrt(head_dim)`` so that each coordinate is close to
``N(0, 1)``, and code every coordinate with the Lloyd-Max quantizer of the standard normal. No calibration, no
centring: the method is data-oblivious by design. Fractional budgets split the coordinates (after rotation they
are exchangeable): e.g. 2.5 bits codes half of them with 3 bits and half with 2 (the paper's 2.5-bit setting spends
its extra bit on outlier channels; with a rotation any subset is equivalent).

Bits per compressed coordinate: the code bits plus ``16 / head_dim`` for the norm (2.25 at 2 bits, head_dim 64).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from transformers.cache_utils import Cache

from ..layer_base import GrowableBuffer, TokenStore
from ..packing import pack, unpack
from .common import compressed_cache, fp16_scale, kv_geometry

NORM_BITS = 16


@functools.lru_cache(maxsize=16)
def gaussian_lloyd_max(bits: int, iters: int = 2000, tol: float = 1e-12) -> torch.Tensor:
    """The ``2**bits`` MSE-optimal centroids of the standard normal distribution (float64, ascending)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"`bits` must be in 1..8, got {bits}.")
    k = 2**bits
    p = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    c = math.sqrt(2.0) * torch.special.erfinv(2 * p - 1)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    for _ in range(iters):
        t = torch.cat([-inf, (c[1:] + c[:-1]) / 2, inf])
        pdf = torch.exp(-0.5 * t.pow(2)) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + torch.special.erf(t / math.sqrt(2.0)))
        new = (pdf[:-1] - pdf[1:]) / (cdf[1:] - cdf[:-1]).clamp_min(1e-300)
        done = float((new - c).abs().max()) < tol
        c = new
        if done:
            break
    return c


@functools.lru_cache(maxsize=256)
def random_rotation(dim: int, seed: int) -> torch.Tensor:
    """A Haar-random ``[dim, dim]`` orthogonal matrix from a seeded generator (QR of a Gaussian, signs fixed)."""
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).float()


def split_bits(bits: float, head_dim: int) -> tuple[int, int, int]:
    """``(hi_bits, hi_count, lo_bits)``: ``hi_count`` coordinates get ``hi_bits``, the rest ``lo_bits``.

    ``hi_count`` is rounded to a multiple of 8 so each part packs into whole bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"TurboQuant `bits` must be in [1, 8], got {bits!r}.")
    lo = int(math.floor(bits + 1e-9))
    frac = bits - lo
    if frac < 1e-9:
        return lo, 0, lo
    count = int(round(frac * head_dim / 8)) * 8
    return lo + 1, min(count, head_dim), lo


class TurboQuantStore(TokenStore):
    """TurboQuant-style store for one layer's keys or values.

    Args:
        bits: code bits per coordinate in [1, 8]; fractional values mix two adjacent widths.
        num_heads: KV heads of the layer.
        head_dim: coordinates per head.
        seed: seed of the random rotation.
    """

    def __init__(self, bits: float, num_heads: int, head_dim: int, *, seed: int = 0) -> None:
        self.num_heads, self.head_dim = int(num_heads), int(head_dim)
        self.hi_bits, self.hi_count, self.lo_bits = split_bits(float(bits), self.head_dim)
        self.lo_count = self.head_dim - self.hi_count
        self.rotation = random_rotation(self.head_dim, int(seed))  # cached: read-only, shared between stores
        self._centroids = {b: gaussian_lloyd_max(b).float() for b in {self.hi_bits, self.lo_bits}}
        self._parts = [(b, s, n) for b, s, n in ((self.hi_bits, 0, self.hi_count),
                                                 (self.lo_bits, self.hi_count, self.lo_count)) if n]
        self._packed = all((n * b) % 8 == 0 for b, _, n in self._parts)
        self.codes = [GrowableBuffer() for _ in self._parts]  # [B, N, H, n * b / 8] uint8 per part
        self.norms = GrowableBuffer()  # [B, N, H] fp16

    def append(self, x: torch.Tensor) -> None:
        d = self.head_dim
        xf = x.float().transpose(1, 2)  # [B, n, H, D]
        norm = fp16_scale(xf.norm(dim=-1, keepdim=True))
        rot = self.rotation.to(x.device)
        u = (xf @ rot) / norm.clamp_min(torch.finfo(torch.float32).tiny) * math.sqrt(d)
        for buf, (bits, start, count) in zip(self.codes, self._parts, strict=True):
            c = self._centroids[bits].to(x.device)
            codes = torch.bucketize(u[..., start : start + count].contiguous(), (c[1:] + c[:-1]) / 2)
            buf.append(pack(codes, bits) if self._packed else codes.to(torch.uint8))
        self.norms.append(norm.squeeze(-1).half())

    def decode(self, dtype: torch.dtype) -> torch.Tensor | None:
        return self.decode_tail(len(self), dtype)

    def decode_tail(self, n: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The last ``n`` stored tokens as ``[B, H, n, D]``."""
        if n <= 0 or len(self) == 0:
            return None
        norms = self.norms.view()[:, -n:]
        parts = []
        for buf, (bits, _, count) in zip(self.codes, self._parts, strict=True):
            raw = buf.view()[:, -n:]
            codes = unpack(raw, bits, count) if self._packed else raw.long()
            parts.append(self._centroids[bits].to(raw.device)[codes])
        u = torch.cat(parts, -1) if len(parts) > 1 else parts[0]  # [B, n, H, D]
        x = (u @ self.rotation.to(u.device).T) * (norms.float().unsqueeze(-1) / math.sqrt(self.head_dim))
        return x.transpose(1, 2).to(dtype)

    def __len__(self) -> int:
        return self.norms.length

    def select_batch(self, index: torch.Tensor) -> None:
        for buf in (*self.codes, self.norms):
            buf.select_batch(index)

    def memory(self) -> dict[str, int]:
        return {"codes": sum(b.nbytes for b in self.codes), "metadata": self.norms.nbytes}

    def bits_per_token(self) -> float:
        code = self.hi_count * self.hi_bits + self.lo_count * self.lo_bits
        return float(self.num_heads * (code + NORM_BITS))


def turboquant_cache(model: Any, bits: float, *, seed: int = 0, sink_tokens: int = 4, window: int = 32) -> Cache:
    """A cache with TurboQuant-style stores in every full-attention layer (rotation seeded per layer and K/V)."""
    heads, head_dim = kv_geometry(model)
    split_bits(float(bits), head_dim)  # validate now, not at the first forward

    def store(layer: int, kind: str) -> TokenStore:
        return TurboQuantStore(bits, heads, head_dim, seed=seed * 100_003 + 2 * layer + (kind == "v"))

    return compressed_cache(model, store, sink_tokens=sink_tokens, window=window)
