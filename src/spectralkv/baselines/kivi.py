"""KIVI-style baseline: asymmetric min-max integer quantization, keys per channel and values per token.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024
(https://arxiv.org/abs/2402.02750, code: https://github.com/jy-yuan/KIVI).

Keys have outlier *channels*, so KIVI quantizes them per channel over a group of ``G`` consecutive tokens (one
scale and zero per channel per group, which is why keys are flushed ``G`` tokens at a time); values are quantized
per token over groups of ``G`` channels. Codes are uniform: ``q = round((x - min) / s)``, ``s = (max - min) /
(2**bits - 1)``; scale and zero are stored in fp16 and used as stored. The full-precision recent window of the paper
is the shared :class:`~spectralkv.layer_base.CompressedLayer` window (plus up to ``G - 1`` tokens waiting for their
key group to fill, as in the paper).

Bits per compressed coordinate (head_dim ``D``, scale + zero = 32 bits per group):
keys ``bits + 32 / G``; values ``bits + 32 / G`` as well (``D / G`` groups per token of ``D`` coordinates).
With ``G = 32``: 2-bit codes cost 3.0 bits, 3-bit 4.0, 4-bit 5.0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.cache_utils import Cache

from ..layer_base import GrowableBuffer, TokenStore
from ..packing import pack, unpack
from .common import compressed_cache, fp16_scale, kv_geometry

DEFAULT_GROUP_SIZE = 32
METADATA_BITS = 32  # fp16 scale + fp16 zero per group


class KiviStore(TokenStore):
    """KIVI-style store for one layer's keys (``per_channel=True``) or values (``per_channel=False``).

    Args:
        bits: code bits per coordinate, an integer in 1..8.
        num_heads: KV heads of the layer.
        head_dim: coordinates per head.
        per_channel: keys: one scale/zero per channel over ``group_size`` tokens; values: one per token over
            ``group_size`` channels.
        group_size: ``G`` (32, as in the paper). For values it must divide ``head_dim``
            (:func:`kivi_cache` uses ``gcd(G, head_dim)`` for values when it does not).
    """

    def __init__(self, bits: int, num_heads: int, head_dim: int, *, per_channel: bool,
                 group_size: int = DEFAULT_GROUP_SIZE) -> None:
        if int(bits) != bits or not 1 <= bits <= 8:
            raise ValueError(f"`bits` for KIVI must be an integer in 1..8, got {bits!r}.")
        if group_size < 1:
            raise ValueError(f"`group_size` must be positive, got {group_size}.")
        if not per_channel and head_dim % group_size:
            raise ValueError(f"`group_size` ({group_size}) must divide head_dim ({head_dim}) for values.")
        self.bits = int(bits)
        self.num_heads, self.head_dim = int(num_heads), int(head_dim)
        self.per_channel = per_channel
        self.group_size = int(group_size)
        self.flush_multiple = self.group_size if per_channel else 1
        self._packed = (self.head_dim * self.bits) % 8 == 0
        self.codes = GrowableBuffer()  # [B, N, H, D * bits / 8] uint8 (or [B, N, H, D] when D * bits is not bytes)
        chunk = max(1, 128 // self.group_size) if per_channel else 128  # grow metadata by ~128 tokens, like codes
        self.scale = GrowableBuffer(chunk)  # keys: [B, N / G, H, D]; values: [B, N, H, D / G]  (fp16)
        self.zero = GrowableBuffer(chunk)

    def append(self, x: torch.Tensor) -> None:
        b, h, n, d = x.shape
        g = self.group_size
        levels = 2**self.bits - 1
        xf = x.float().transpose(1, 2)  # [B, n, H, D]
        if self.per_channel:
            if n % g:
                raise ValueError(f"KIVI keys are appended in multiples of {g} tokens, got {n}.")
            grouped = xf.reshape(b, n // g, g, h, d)
            lo, hi = grouped.amin(2, keepdim=True), grouped.amax(2, keepdim=True)
        else:
            grouped = xf.reshape(b, n, h, d // g, g)
            lo, hi = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
        zero = fp16_scale(lo)
        scale = fp16_scale((hi - lo) / levels)
        q = torch.where(scale > 0, (grouped - zero) / scale.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        codes = q.round().clamp_(0, levels).to(torch.uint8).reshape(b, n, h, d)
        self.codes.append(pack(codes, self.bits) if self._packed else codes)
        self.scale.append(scale.squeeze(2 if self.per_channel else -1).half())
        self.zero.append(zero.squeeze(2 if self.per_channel else -1).half())

    def decode(self, dtype: torch.dtype) -> torch.Tensor | None:
        return self.decode_tail(len(self), dtype)

    def decode_tail(self, n: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The last ``n`` stored tokens as ``[B, H, n, D]`` (``n`` a multiple of ``flush_multiple``)."""
        if n <= 0 or len(self) == 0:
            return None
        h, d, g = self.num_heads, self.head_dim, self.group_size
        codes = self.codes.view()[:, -n:]
        q = (unpack(codes, self.bits, d) if self._packed else codes).float()  # [B, n, H, D]
        b = q.shape[0]
        rows = n // g if self.per_channel else n
        scale, zero = self.scale.view()[:, -rows:].float(), self.zero.view()[:, -rows:].float()
        if self.per_channel:
            x = q.view(b, rows, g, h, d) * scale.unsqueeze(2) + zero.unsqueeze(2)
        else:
            x = q.view(b, n, h, d // g, g) * scale.unsqueeze(-1) + zero.unsqueeze(-1)
        return x.reshape(b, n, h, d).transpose(1, 2).to(dtype)

    def __len__(self) -> int:
        return self.codes.length

    def select_batch(self, index: torch.Tensor) -> None:
        for buf in (self.codes, self.scale, self.zero):
            buf.select_batch(index)

    def memory(self) -> dict[str, int]:
        return {"codes": self.codes.nbytes, "metadata": self.scale.nbytes + self.zero.nbytes}

    def bits_per_token(self) -> float:
        h, d, g = self.num_heads, self.head_dim, self.group_size
        metadata = h * d * METADATA_BITS / g if self.per_channel else h * (d // g) * METADATA_BITS
        return float(h * d * self.bits + metadata)


def kivi_cache(model: Any, bits: int, *, group_size: int = DEFAULT_GROUP_SIZE, sink_tokens: int = 4,
               window: int = 32) -> Cache:
    """A cache with KIVI-style stores (keys per channel, values per token) in every full-attention layer."""
    heads, head_dim = kv_geometry(model)
    value_group = math.gcd(group_size, head_dim)
    KiviStore(bits, heads, head_dim, per_channel=False, group_size=value_group)  # validate now, not at first forward

    def store(layer: int, kind: str) -> TokenStore:
        if kind == "k":
            return KiviStore(bits, heads, head_dim, per_channel=True, group_size=group_size)
        return KiviStore(bits, heads, head_dim, per_channel=False, group_size=value_group)

    return compressed_cache(model, store, sink_tokens=sink_tokens, window=window)
