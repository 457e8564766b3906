"""Encode and decode one layer's keys (or values) in its calibrated spectral basis: the PyTorch reference path.

Write path, per token and KV head: ``z = U^T (x - mu) / sqrt(lambda)`` (rotated, centred, standardised), optionally
divided by a per-token scale ``s = rms(z)`` (stored in fp16, or as one byte on a calibrated log scale: see
:mod:`spectralkv.scales`), then each coordinate is replaced by the index of its nearest centroid in the codebook of
its bit width, and the codes are packed (see :mod:`spectralkv.packing`).

Outliers (dense-and-sparse): with an ``outlier_threshold`` t, every coordinate with ``|z| > t`` (in the codebook's
domain, after the per-token scale) is also stored exactly, as an fp16 value plus its index within the token, and
decodes to that value. Heavy tails are what a fixed codebook handles worst: on SmolLM2 keeping the 0.25% of
coordinates beyond 4 standard deviations halved the 4-bit perplexity loss. See :class:`Outliers` for the layout.
Coordinates are permuted so each bit width is a contiguous byte-aligned range of the row; 0-bit coordinates cost
nothing and decode to the mean. The Triton kernels use exactly this layout and must reproduce these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import codebook as cb
from .packing import packed_bytes
from .positions import check_frequencies, position_features
from .positions import rotate as rope_rotate
from .row_decoder import RowDecoder, build_row_decoder
from .scales import FP16, ScaleCodec

EIGENVALUE_FLOOR = 1e-10


def outlier_count_bits(coords: int) -> int:
    """Bits of one token's outlier count, for ``coords`` coordinates per token (all heads of a layer)."""
    return 8 if coords <= 255 else 16


def outlier_entry_bits(coords: int) -> int:
    """Bits of one stored outlier: its index within the token and its fp16 value."""
    return (8 if coords <= 256 else 16) + 16


@dataclass
class Outliers:
    """The exact coordinates of a block of tokens ``[B, T]``, in CSR form ordered token-major (t, then b, then index).

    ``counts[b, t]`` is how many entries token ``t`` of row ``b`` has; ``index`` is ``head * D + coordinate`` in
    packing order; ``values`` the coordinate in the codebook's domain (fp16). Token-major order lets a store append
    block after block and still find the entries of its last ``n`` tokens at the end.
    """

    counts: torch.Tensor  # [B, T] uint8 (int16 when a token has more than 255 coordinates)
    index: torch.Tensor  # [E] uint8 (int16 when H * D > 256)
    values: torch.Tensor  # [E] fp16

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row b, token t) of every entry."""
        b, t = self.counts.shape
        flat = self.counts.t().reshape(-1).long()
        tb = torch.repeat_interleave(torch.arange(t * b, device=flat.device), flat)
        return tb % b, tb // b


@dataclass(frozen=True)
class SlotOutliers:
    """The exact coordinates of a block of tokens ``[B, T]`` in fixed slots: at most ``C`` per token (the static
    cache, whose buffers cannot grow). Slots ``j >= counts[b, t]`` are unused; the used ones hold the token's largest
    outliers (order within a token does not matter: every entry replaces a different coordinate).

    ``starts`` (optional) is the flat offset of each token's first slot in the storage of ``index`` / ``values``,
    which the Triton kernel reads; without it the launcher computes it from their strides."""

    counts: torch.Tensor  # [B, T] uint8 (int16 when a token has more than 255 coordinates)
    index: torch.Tensor  # [B, T, C] uint8 (int16 when H * D > 256): head * D + coordinate, packing order
    values: torch.Tensor  # [B, T, C] fp16
    starts: torch.Tensor | None = None  # [B, T] int32/int64

    def flat_starts(self) -> torch.Tensor:
        """``[B, T]`` offset of each token's first slot (from the strides of ``index``, shared with ``values``)."""
        if self.starts is not None:
            return self.starts
        return slot_starts(self.index.shape[0], self.index.shape[1], self.index.stride(0), self.index.stride(1),
                           self.index.device)


def slot_starts(batch: int, tokens: int, stride_b: int, stride_t: int, device: torch.device | str) -> torch.Tensor:
    """``[B, T]`` flat offsets ``b * stride_b + t * stride_t`` (int32 unless they need 64 bits)."""
    dtype = torch.int32 if (batch - 1) * stride_b + (tokens - 1) * stride_t < 2**31 else torch.int64
    b = torch.arange(batch, device=device, dtype=dtype).unsqueeze(1) * stride_b
    return b + torch.arange(tokens, device=device, dtype=dtype).unsqueeze(0) * stride_t


@dataclass(frozen=True)
class CoordinateTables:
    """Per-coordinate tables of a quantizer, index ``h * D + e`` (packing order), on one device."""

    nbits: torch.Tensor  # [H*D] int64
    byte: torch.Tensor  # [H*D] int64: row byte holding the coordinate's first bit
    shift: torch.Tensor  # [H*D] int32: bit position within ``byte``
    boundaries: torch.Tensor  # [H*D, 255] float32 decision boundaries, +inf padded (0 bits: all +inf)
    centroids: torch.Tensor  # [9 * 256] float32, row 0 zeros
    centroid_base: torch.Tensor  # [H*D] int64: nbits * 256


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

    With ``head_group`` g > 1, g consecutive KV heads share one basis of dimension ``g * head_dim`` (their
    coordinates side by side): ``H`` and ``D`` below are then the number of bases and their dimension, while tensors
    in and out keep the model's layout ``[B, KV heads, T, head_dim]``. Keys and values of the heads of one layer are
    correlated (they are projections of the same hidden state), which one basis per head cannot exploit.

    Args:
        mean: ``[H, D]`` calibration mean.
        basis: ``[H, D, D]`` orthonormal eigenvectors (columns), eigen order.
        eigenvalues: ``[H, D]`` eigenvalues, eigen order.
        codebooks: ``[8, 256]`` Lloyd-Max centroid table (see :func:`spectralkv.codebook.fit_codebooks`).
        bits: ``[H, D]`` bits per coordinate (eigen order), each bit width used a multiple of 8 times per head.
        token_scale: whether each token carries a scale.
        scale_range: ``(lo, hi)`` log2 range of a ``log8`` scale (one byte per token and head, see
            :mod:`spectralkv.scales`); None: the scale is stored in fp16.
        outlier_threshold: coordinates beyond this many (scaled) standard deviations are stored exactly; None: off.
        outlier_cap: at most this many outliers per token (all heads; the largest are kept), which bounds the
            worst case on text unlike the calibration's; None: no cap.
        position_mean: ``[KV heads, head_dim]`` pre-RoPE key mean ``m`` for RoPE-aware centring (keys only; see
            :mod:`spectralkv.positions`): a token at position ``p`` is centred on ``mean + R_p m``, and every
            encode/decode then needs the tokens' positions. None: centred on ``mean`` alone.
        frequencies: ``[head_dim]`` RoPE frequencies of ``R_p`` (with ``position_mean``).
        head_group: KV heads per basis (1: one basis per head).
    """

    def __init__(
        self,
        mean: torch.Tensor,
        basis: torch.Tensor,
        eigenvalues: torch.Tensor,
        codebooks: torch.Tensor,
        bits: torch.Tensor,
        token_scale: bool,
        outlier_threshold: float | None = None,
        outlier_cap: int | None = None,
        position_mean: torch.Tensor | None = None,
        frequencies: torch.Tensor | None = None,
        scale_range: torch.Tensor | tuple[float, float] | None = None,
        head_group: int = 1,
    ) -> None:
        self.num_heads, self.head_dim = mean.shape
        if isinstance(head_group, bool) or not isinstance(head_group, int) or head_group < 1 \
                or self.head_dim % head_group:
            raise ValueError(f"head_group must be a positive divisor of the basis dimension {self.head_dim}, got "
                             f"{head_group!r}.")
        self.head_group = head_group
        self.kv_heads, self.kv_head_dim = self.num_heads * self.head_group, self.head_dim // self.head_group
        if (position_mean is None) != (frequencies is None):
            raise ValueError("position_mean and frequencies come together (RoPE-aware centring) or not at all.")
        self.position_mean = None if position_mean is None else position_mean.float()
        self.frequencies = None if frequencies is None else check_frequencies(frequencies, self.kv_head_dim)
        real = (self.kv_heads, self.kv_head_dim)
        if self.position_mean is not None and tuple(self.position_mean.shape) != real:
            raise ValueError(f"position_mean must be [KV heads, head_dim] = {real}, got "
                             f"{tuple(position_mean.shape)}.")
        self.token_scale = bool(token_scale)
        if scale_range is not None and not self.token_scale:
            raise ValueError("scale_range describes a per-token scale; this quantizer has none (token_scale=False).")
        self.scale_codec: ScaleCodec = FP16 if scale_range is None else ScaleCodec(
            "log8", tuple(float(x) for x in torch.as_tensor(scale_range).reshape(-1).tolist()))
        if outlier_threshold is not None and not outlier_threshold > 0:
            raise ValueError(f"outlier_threshold must be > 0 or None, got {outlier_threshold!r}.")
        self.outlier_threshold = None if outlier_threshold is None else float(outlier_threshold)
        if outlier_cap is not None and outlier_cap < 1:
            raise ValueError(f"outlier_cap must be >= 1 or None, got {outlier_cap!r}.")
        self.outlier_cap = outlier_cap
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
        self._position_cache: dict[torch.device, torch.Tensor] = {}
        self._coord_cache: dict[torch.device, CoordinateTables] = {}
        self._row_decoders: dict[torch.device, RowDecoder] = {}

    # -- accounting -------------------------------------------------------------------------------------------
    @property
    def code_bits_per_token(self) -> int:
        return int(self.bits.long().sum())

    @property
    def bits_per_token(self) -> int:
        """Fixed bits stored per token for all heads of this layer: codes, scales and the outlier count (the
        outlier entries themselves come on top, :attr:`outlier_entry_bits` each)."""
        return self.code_bits_per_token + self.scale_bits_per_token + self.outlier_count_bits

    @property
    def scale_bits_per_token(self) -> int:
        """Bits of one token's scales, all heads (0 without a per-token scale)."""
        return self.scale_codec.bits * self.num_heads if self.token_scale else 0

    @property
    def scale_dtype(self) -> torch.dtype:
        """Dtype of a stored scale (fp16, or uint8 for a log8 scale)."""
        return self.scale_codec.dtype

    def scale_values(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored scales (any shape) -> the float32 scales they stand for."""
        return self.scale_codec.values(stored)

    def _scaled(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``z`` ``[B, H, T, D]`` divided by its per-token scale, and the stored scales ``[B, H, T]`` (or ``z``, None
        without a per-token scale)."""
        if not self.token_scale:
            return z, None
        stored = self.scale_codec.encode_mean_square(z.pow(2).mean(-1))
        return z / self.scale_codec.values(stored).unsqueeze(-1), stored

    @property
    def coords(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def outlier_count_bits(self) -> int:
        """Bits of the per-token outlier count (0 without outliers)."""
        return 0 if self.outlier_threshold is None else outlier_count_bits(self.coords)

    @property
    def outlier_entry_bits(self) -> int:
        """Bits per stored outlier: its index within the token and its fp16 value."""
        return outlier_entry_bits(self.coords)

    @property
    def outlier_count_dtype(self) -> torch.dtype:
        """Dtype of a per-token outlier count (as :func:`outlier_count_bits` accounts it)."""
        return torch.uint8 if self.coords <= 255 else torch.int16

    @property
    def outlier_index_dtype(self) -> torch.dtype:
        """Dtype of an outlier's index within its token (as :func:`outlier_entry_bits` accounts it)."""
        return torch.uint8 if self.coords <= 256 else torch.int16

    # -- tensors on the right device (the layer's device, moved lazily) -----------------------------------------
    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._device_cache:
            self._device_cache[device] = tuple(
                t.to(device) for t in (self.mean, self.encoder, self.decoder, self.codebooks)
            )
        return self._device_cache[device]

    def coordinate_tables(self, device: torch.device | str) -> CoordinateTables:
        """Per-coordinate layout and codebook tables (all heads and regimes at once), built once per device; the
        Triton kernels' tables (:mod:`spectralkv.kernels.layout`) are these, reshaped."""
        device = torch.device(device)
        if device not in self._coord_cache:
            hd = self.coords
            nbits = torch.zeros(hd, dtype=torch.long)
            byte = torch.zeros(hd, dtype=torch.long)
            shift = torch.zeros(hd, dtype=torch.int32)
            for h in range(self.num_heads):
                for r in self.regimes[h]:
                    j = torch.arange(r.count)
                    sl = slice(h * self.head_dim + r.start, h * self.head_dim + r.start + r.count)
                    nbits[sl] = r.bits
                    byte[sl] = self.head_byte_offsets[h] + r.byte_offset + (j * r.bits) // 8
                    shift[sl] = ((j * r.bits) % 8).to(torch.int32)
            bnd = torch.full((cb.MAX_BITS + 1, cb.CODEBOOK_SIZE - 1), float("inf"))
            cent = torch.zeros(cb.MAX_BITS + 1, cb.CODEBOOK_SIZE)
            for b in range(1, cb.MAX_BITS + 1):
                edges = cb.boundaries(self.codebooks, b)
                bnd[b, : edges.numel()] = edges
                cent[b] = self.codebooks[b - 1]
            self._coord_cache[device] = CoordinateTables(
                nbits=nbits.to(device),
                byte=byte.to(device),
                shift=shift.to(device),
                boundaries=bnd[nbits].contiguous().to(device),
                centroids=cent.reshape(-1).to(device),
                centroid_base=(nbits * cb.CODEBOOK_SIZE).to(device),
            )
        return self._coord_cache[device]

    def row_decoder(self, device: torch.device | str) -> RowDecoder:
        """Byte-lookup decoder of packed rows (:mod:`spectralkv.row_decoder`), built once per device."""
        device = torch.device(device)
        if device not in self._row_decoders:
            self._row_decoders[device] = build_row_decoder(self, device)
        return self._row_decoders[device]

    def _codes(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, H, T, D]`` coordinates -> ``[B, T, H * D]`` int64 codes (0 for 0-bit coordinates), every regime in one
        ``searchsorted`` (same buckets as :func:`spectralkv.codebook.quantize`)."""
        b, h, t, d = z.shape
        tab = self.coordinate_tables(z.device)
        flat = z.permute(1, 3, 0, 2).reshape(h * d, b * t).contiguous()
        codes = torch.searchsorted(tab.boundaries, flat)  # [H*D, B*T]
        return codes.view(h * d, b, t).permute(1, 2, 0)

    def _centroids(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, T, H * D]`` codes -> ``[B, H, T, D]`` float32 centroids (0 for 0-bit coordinates)."""
        tab = self.coordinate_tables(codes.device)
        b, t, _ = codes.shape
        z = tab.centroids[tab.centroid_base + codes]
        return z.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    @property
    def position_centred(self) -> bool:
        """Whether tokens are centred per position (RoPE-aware), so every encode/decode needs their positions."""
        return self.position_mean is not None

    def to_bases(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, KV heads, T, head_dim]`` (model layout) -> ``[B, H, T, D]`` (one row per basis); the tensor itself
        when the basis is per head, else a reshaped copy."""
        if self.head_group == 1:
            return x
        b, _, t, _ = x.shape
        return x.transpose(1, 2).reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def from_bases(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_bases` (the tensor itself when the basis is per head, else a reshaped copy)."""
        if self.head_group == 1:
            return x
        b, _, t, _ = x.shape
        return x.transpose(1, 2).reshape(b, t, self.kv_heads, self.kv_head_dim).transpose(1, 2)

    def centre(self, positions: torch.Tensor | None, device: torch.device, batch: int = 1, tokens: int = 1
               ) -> torch.Tensor:
        """What tokens are centred on, in the model's layout: ``[1, KV heads, 1, head_dim]`` (the mean), or ``[B, KV
        heads, T, head_dim]`` with positions ``[B, T]`` (``[T]`` is shared by every row) when the quantizer is
        position-centred."""
        mean = self._on(device)[0].reshape(self.kv_heads, self.kv_head_dim)[None, :, None, :]
        term = self.position_term(positions, device, batch, tokens)
        return mean if term is None else mean + term

    def position_term(self, positions: torch.Tensor | None, device: torch.device, batch: int = 1, tokens: int = 1
                      ) -> torch.Tensor | None:
        """``R_p m`` ``[B, KV heads, T, head_dim]`` (float32) at ``positions``: the per-position part of the centre;
        None when the quantizer is not position-centred."""
        if self.position_mean is None:
            return None
        if positions is None:
            raise ValueError("This quantizer centres keys on their RoPE position (a position-centred calibration): "
                             "pass the tokens' positions.")
        positions = torch.as_tensor(positions, device=device).long()
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)
        if positions.dim() != 2 or positions.shape[-1] != tokens or positions.shape[0] not in (1, batch):
            raise ValueError(f"positions must be [B, T] = [{batch}, {tokens}] (or [T]), got {tuple(positions.shape)}.")
        cos, sin = position_features(positions, self.frequencies)  # [B, T, D]
        m = self._position_mean_on(device)[None, :, None, :]
        return rope_rotate(m, cos[:, None], sin[:, None])

    def _position_mean_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._position_cache:
            self._position_cache[device] = self.position_mean.to(device)
        return self._position_cache[device]

    def rotate(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, KV heads, T, head_dim]`` -> standardised rotated coordinates ``[B, H, T, D]`` in packing order
        (float32)."""
        _, enc, _, _ = self._on(x.device)
        centre = self.centre(positions, x.device, x.shape[0], x.shape[2])
        return torch.einsum("bhtd,hde->bhte", self.to_bases(x.float() - centre), enc)

    def encode(self, x: torch.Tensor, positions: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, KV heads, T, head_dim]`` -> (packed ``[B, T, row_bytes]`` uint8, stored scales ``[B, T, H]`` or
        None).

        Codes and scales only: use :meth:`encode_with_outliers` when the quantizer keeps outliers."""
        return self.encode_with_outliers(x, positions=positions)[:2]

    def outlier_mask(self, z: torch.Tensor) -> torch.Tensor | None:
        """``[B, H, T, D]`` bool: the coordinates stored exactly (beyond the threshold, at most ``outlier_cap``
        largest per token)."""
        if self.outlier_threshold is None:
            return None
        mag = z.abs()
        mask = mag > self.outlier_threshold
        b, h, t, d = z.shape
        if self.outlier_cap is not None and self.outlier_cap < h * d:
            mag = mag.masked_fill(~mask, 0).permute(0, 2, 1, 3).reshape(b, t, h * d)
            over = (mask.permute(0, 2, 1, 3).reshape(b, t, h * d).sum(-1) > self.outlier_cap).unsqueeze(-1)
            if bool(over.any()):
                kth = mag.topk(self.outlier_cap, dim=-1).values[..., -1:]  # smallest kept magnitude per token
                keep = ~over | (mag >= kth)
                mask = mask & keep.reshape(b, t, h, d).permute(0, 2, 1, 3)
        return mask

    def find_outliers(self, z: torch.Tensor) -> Outliers | None:
        """Coordinates of ``z`` ``[B, H, T, D]`` (codebook domain, packing order) to store exactly."""
        full = self.outlier_mask(z)
        if full is None:
            return None
        b, h, t, d = z.shape
        zt = z.permute(2, 0, 1, 3).reshape(t, b, h * d)  # token-major
        mask = full.permute(2, 0, 1, 3).reshape(t, b, h * d)
        counts = mask.sum(-1).t().contiguous()  # [B, T]
        tb, idx = mask.reshape(t * b, h * d).nonzero(as_tuple=True)
        values = zt.reshape(t * b, h * d)[tb, idx].to(torch.float16)
        return Outliers(counts.to(self.outlier_count_dtype), idx.to(self.outlier_index_dtype), values)

    def find_slot_outliers(self, z: torch.Tensor, slots: int | None = None) -> SlotOutliers | None:
        """:meth:`find_outliers` with static shapes: the ``slots`` (default ``outlier_cap``) largest coordinates of
        each token, of which those beyond the threshold are used. The same set as :meth:`find_outliers` whenever
        ``slots`` is the cap (up to exact ties in magnitude at the cap), with no host synchronisation, so a compiled
        decode step can run it."""
        if self.outlier_threshold is None:
            return None
        b, h, t, d = z.shape
        cap = slots if slots is not None else self.outlier_cap
        cap = h * d if cap is None else min(int(cap), h * d)
        zt = z.permute(0, 2, 1, 3).reshape(b, t, h * d)
        mag, idx = zt.abs().topk(cap, dim=-1)  # sorted: the used slots come first
        counts = (mag > self.outlier_threshold).sum(-1)
        values = zt.gather(-1, idx).to(torch.float16)
        return SlotOutliers(counts.to(self.outlier_count_dtype), idx.to(self.outlier_index_dtype), values)

    @staticmethod
    def apply_outliers(z: torch.Tensor, outliers: Outliers | SlotOutliers | None) -> torch.Tensor:
        """Write the exact coordinates into ``z`` ``[B, H, T, D]`` (in place; returned)."""
        if isinstance(outliers, SlotOutliers):
            return _apply_slot_outliers(z, outliers)
        if outliers is None or outliers.values.numel() == 0:
            return z
        b, h, t, d = z.shape
        rows, toks = outliers.positions()
        idx = outliers.index.long()
        z[rows, idx // d, toks, idx % d] = outliers.values.to(z.dtype)
        return z

    def encode_with_outliers(self, x: torch.Tensor, *, slots: int | None = None,
                             positions: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor | None, Outliers | SlotOutliers | None]:
        """Like :meth:`encode`, plus the exact outliers (None when the threshold is off); with ``slots`` they come
        in fixed slots (:meth:`find_slot_outliers`, for the static cache). ``positions`` ``[B, T]``: the tokens'
        positions, needed (only) by a position-centred quantizer.

        All heads and regimes at once through per-coordinate tables (byte, shift, boundaries): the same rows as
        packing each regime with :func:`spectralkv.packing.pack` (the tests check it), without a Python loop per
        regime, which dominated a decode step on CPU."""
        z, scales = self._scaled(self.rotate(x, positions))
        if scales is not None:
            scales = scales.transpose(1, 2).contiguous()
        outliers = self.find_outliers(z) if slots is None else self.find_slot_outliers(z, slots)
        b, _, t, _ = z.shape
        tab = self.coordinate_tables(x.device)
        val = self._codes(z).to(torch.int32) << tab.shift  # at most 15 bits: a code spans at most two bytes
        rows = torch.zeros(b, t, self.row_bytes + 2, dtype=torch.int32, device=x.device)  # + spill room
        # codes never share a bit, so adding them into their bytes is OR-ing them in
        rows.scatter_add_(2, tab.byte.expand(b, t, -1), val & 0xFF)
        rows.scatter_add_(2, (tab.byte + 1).expand(b, t, -1), val >> 8)
        return rows[..., : self.row_bytes].to(torch.uint8), scales, outliers

    def decode_rotated(self, packed: torch.Tensor, scales: torch.Tensor | None,
                       outliers: Outliers | SlotOutliers | None = None) -> torch.Tensor:
        """Packed rows -> reconstructed standardised coordinates ``[B, H, T, D]`` (packing order, float32; a
        transposed view of ``[B, T, H, D]`` storage)."""
        centroids = self.row_decoder(packed.device)(packed)
        values = None if scales is None else self.scale_values(scales)
        return rotated_from_centroids(centroids, self.num_heads, self.head_dim, values, outliers)

    def decode(self, packed: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype,
               outliers: Outliers | SlotOutliers | None = None, positions: torch.Tensor | None = None, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Packed rows (and their outliers) -> ``[B, KV heads, T, head_dim]`` keys or values in ``dtype``
        (``positions``: as encoded, for a position-centred quantizer). ``out``: write them there instead (a view of
        the tensor attention reads, so a decode step does not copy the whole store once more); returned."""
        _, _, dec, _ = self._on(packed.device)
        centre = self.centre(positions, packed.device, packed.shape[0], packed.shape[1])
        x = self.from_bases(torch.einsum("bhte,hed->bhtd", self.decode_rotated(packed, scales, outliers), dec))
        if out is None:
            return (x + centre).to(dtype)
        if out.dtype == x.dtype:
            return torch.add(x, centre, out=out)
        return out.copy_(x.add_(centre))

    def fake_quantize(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """What the cache returns for ``x`` after encode + decode, without the (lossless) packing step.

        Used by calibration, where the same tokens are quantized many times; equal to
        ``decode(*encode_with_outliers(x))`` (the tests check it).
        """
        _, _, dec, _ = self._on(x.device)
        centre = self.centre(positions, x.device, x.shape[0], x.shape[2])
        z, stored = self._scaled(self.rotate(x, positions))
        scales = None if stored is None else self.scale_values(stored).unsqueeze(-1)
        zq = self._centroids(self._codes(z)).to(z.dtype)
        mask = self.outlier_mask(z)
        if mask is not None:
            zq = torch.where(mask, z.half().to(z.dtype), zq)
        if scales is not None:
            zq = zq * scales
        return (self.from_bases(torch.einsum("bhte,hed->bhtd", zq, dec)) + centre).to(x.dtype)


def rotated_from_centroids(z: torch.Tensor, num_heads: int, head_dim: int, scales: torch.Tensor | None,
                           outliers: Outliers | SlotOutliers | None) -> torch.Tensor:
    """Decoded centroids ``[B, T, H * D]`` (a fresh float32 tensor, changed in place) -> the coordinates ``[B, H, T,
    D]``: exact outliers written over their centroids, then everything times the token's scale (``scales``: the
    float values ``[B, T, H]``, see :meth:`SpectralQuantizer.scale_values`). Works in the
    decoder's token-major layout, so it costs no copy."""
    b, t, _ = z.shape
    if isinstance(outliers, Outliers) and outliers.values.numel():
        rows, toks = outliers.positions()
        z[rows, toks, outliers.index.long()] = outliers.values.to(z.dtype)
    z = z.view(b, t, num_heads, head_dim)
    if isinstance(outliers, SlotOutliers):
        _apply_slot_outliers(z.transpose(1, 2), outliers)
    if scales is not None:
        z.mul_(scales.to(z.dtype).unsqueeze(-1))
    return z.transpose(1, 2)


def _apply_slot_outliers(z: torch.Tensor, outliers: SlotOutliers) -> torch.Tensor:
    """Static-shape scatter of slot outliers into ``z`` ``[B, H, T, D]``: unused slots write into a padding column,
    so no data-dependent shape (or duplicate index) appears."""
    b, h, t, d = z.shape
    c = outliers.index.shape[-1]
    used = torch.arange(c, device=z.device) < outliers.counts.unsqueeze(-1).long()  # [B, T, C]
    idx = torch.where(used, outliers.index.long(), h * d)
    flat = torch.cat([z.permute(0, 2, 1, 3).reshape(b, t, h * d), z.new_zeros(b, t, 1)], dim=-1)
    flat.scatter_(-1, idx, outliers.values.to(z.dtype))
    z.copy_(flat[..., : h * d].reshape(b, t, h, d).permute(0, 2, 1, 3))
    return z
