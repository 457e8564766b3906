"""PyTorch references for the Triton kernels; also the production path on CPU (pure PyTorch, never imports Triton).

Decode attention straight from packed codes, for one query token per sequence. With ``k = mu + z_hat @ Dec`` (the
quantizer's decoder, rows indexed by packing-order coordinates) and ``z_hat = s * centroid[code]``::

    q . k = q . mu + z_hat . (Dec q) = q . mu + s * sum_e q_rot[e] * centroid[code_e],   q_rot = q @ Dec^T

so the query is rotated once per step, and the score of a compressed token needs only its codes, its scale and a
table lookup per coordinate (``q . mu`` is the same for every compressed token of a head); an exact outlier
coordinate simply replaces its centroid. Position-centred keys (RoPE-aware, :mod:`spectralkv.positions`) add one
term per token, ``q . R_p m = (q * m) . cos(p w) + (q * rotate_half(m)) . sin(p w)``: two more products with the
token's cos/sin, computed from its position (the store keeps each row's first; tokens are consecutive). For the values,
``sum_t p_t v_t = (sum_t p_t) mu_v + (sum_t p_t z_hat_t) @ Dec_v``: the softmax-weighted sum is accumulated in the
rotated basis and un-rotated once at the end.

The full-precision tokens (sinks, recent window and the new token) are an ordinary attention over model-dtype
tensors; here they share one softmax with the compressed tokens, which makes the reference equal, up to fp32
rounding, to SDPA over ``SpectralQuantizer.decode`` output concatenated with those tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from spectralkv.positions import position_features, rotate_half
from spectralkv.quantizer import Outliers, SlotOutliers, SpectralQuantizer, rotated_from_centroids

from .layout import SpectralTables, tables_for

LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class PackedSide:
    """Compressed keys (or values) of one layer as stored: code rows, optional per-token scales, and the exact
    outlier coordinates (which replace their coordinate's centroid) when the quantizer keeps them."""

    quantizer: SpectralQuantizer
    codes: torch.Tensor  # [B, N, row_bytes] uint8
    scales: torch.Tensor | None  # [B, N, H] as stored: fp16, or uint8 levels of a log8 scale
    outliers: Outliers | SlotOutliers | None = None  # CSR (counts [B, N], token-major entries) or fixed slots
    positions: torch.Tensor | None = None  # [B, 1] position of each row's first token (position-centred keys)
    rows_share_positions: bool = False  # every row's tokens sit at the same positions (no left padding)

    @property
    def length(self) -> int:
        return self.codes.shape[1]

    def token_positions(self) -> torch.Tensor | None:
        """``[B, N]`` positions of the tokens, ``[1, N]`` when the rows share them (None unless the quantizer is
        position-centred)."""
        if not self.quantizer.position_centred:
            return None
        if self.positions is None:
            raise ValueError("These keys are position-centred: their PackedSide needs `positions` (each row's first).")
        first = self.positions[:1] if self.rows_share_positions else self.positions
        return first + torch.arange(self.length, device=self.positions.device)


def position_scores(qf: torch.Tensor, k: PackedSide) -> torch.Tensor | None:
    """``q . R_p m`` ``[B, Hkv, G, N]`` for position-centred keys (None otherwise), from ``qf`` ``[B, Hkv, G, D]``."""
    pos = k.token_positions()
    if pos is None:
        return None
    quant = k.quantizer
    cos, sin = position_features(pos.to(qf.device), quant.frequencies)  # [B or 1, N, D]
    m = quant.position_mean.to(qf.device)[None, :, None, :]
    if pos.shape[0] == 1:  # rows share positions: one cos/sin per position
        cos, sin, spec = cos[0], sin[0], "bhgd,nd->bhgn"
    else:
        spec = "bhgd,bnd->bhgn"
    return torch.einsum(spec, qf * m, cos) + torch.einsum(spec, qf * rotate_half(m), sin)


def encode_ref(quantizer: SpectralQuantizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference for :func:`spectralkv.kernels.encode.spectral_encode`: the quantizer's own encoder."""
    return quantizer.encode(x)


def coordinate_centroids(tables: SpectralTables, codes: torch.Tensor) -> torch.Tensor:
    """Packed rows ``[B, N, row_bytes]`` -> centroids ``[B, N, H, D]`` the way the kernels decode them: one byte gather
    per coordinate through the layout tables, all heads and regimes at once. The tests hold ``tables.rows`` (the byte
    lookups the PyTorch path uses) and :func:`spectralkv.packing.unpack` to it."""
    h, d = tables.num_heads, tables.head_dim
    if codes.shape[-1] == 0:  # every coordinate at 0 bits
        return codes.new_zeros(codes.shape[0], codes.shape[1], h, d, dtype=torch.float32)
    flat = tables.byte_index.reshape(-1).long()
    spills = (tables.nbits > 0) & (tables.shift + tables.nbits > 8)
    lo = codes[..., flat].to(torch.int32)
    hi = codes[..., (flat + 1).clamp_max(codes.shape[-1] - 1)].to(torch.int32) * spills.reshape(-1)
    mask = (1 << tables.nbits.reshape(-1)) - 1
    code = ((lo | (hi << 8)) >> tables.shift.reshape(-1)) & mask
    z = tables.centroids.reshape(-1)[(tables.nbits.reshape(-1) * tables.centroids.shape[1]) + code]
    return z.view(codes.shape[0], codes.shape[1], h, d)


def decode_rotated_ref(tables: SpectralTables, codes: torch.Tensor, scales: torch.Tensor | None,
                       outliers: Outliers | SlotOutliers | None = None) -> torch.Tensor:
    """Packed rows ``[B, N, row_bytes]`` (and their outliers) -> standardised rotated coordinates ``[B, H, N, D]``.

    Same numbers as :meth:`SpectralQuantizer.decode_rotated`, from the tables alone (so a compiled step holds
    everything it reads); the codes are decoded by the byte lookups of ``tables.rows``.
    """
    return rotated_from_centroids(tables.rows(codes), tables.num_heads, tables.head_dim, tables.scale_values(scales),
                                  outliers)


def _check(q: torch.Tensor, k: PackedSide, v: PackedSide, k_fp: torch.Tensor | None, v_fp: torch.Tensor | None
           ) -> tuple[int, int, int, int]:
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, query_heads, head_dim], got shape {tuple(q.shape)}.")
    b, hq, d = q.shape
    hkv = k.quantizer.num_heads
    if hq % hkv:
        raise ValueError(f"{hq} query heads is not a multiple of {hkv} KV heads.")
    if k.quantizer.head_dim != d or v.quantizer.head_dim != d or v.quantizer.num_heads != hkv:
        raise ValueError("query, key and value quantizers disagree on heads or head_dim.")
    if k.codes.shape[:2] != v.codes.shape[:2] or k.codes.shape[0] != b:
        raise ValueError(f"key codes {tuple(k.codes.shape)} and value codes {tuple(v.codes.shape)} do not match "
                         f"the batch of q ({b}).")
    if (k_fp is None) != (v_fp is None):
        raise ValueError("give both full-precision keys and values, or neither.")
    return b, hq, hkv, d


def decode_attention_ref(
    q: torch.Tensor,
    k: PackedSide,
    v: PackedSide,
    k_fp: torch.Tensor | None = None,
    v_fp: torch.Tensor | None = None,
    comp_mask: torch.Tensor | None = None,
    fp_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    *,
    comp_lengths: torch.Tensor | None = None,
    tables: tuple[SpectralTables, SpectralTables] | None = None,
) -> torch.Tensor:
    """One decode step of attention over compressed and full-precision tokens.

    Args:
        q: ``[B, Hq, D]`` the new token's queries (``Hq`` a multiple of the ``Hkv`` KV heads).
        k, v: the compressed keys and values (``N`` tokens, possibly 0).
        k_fp, v_fp: ``[B, Hkv, W, D]`` full-precision keys and values (sinks, window, new token), or None.
        comp_mask: ``[B, N]`` bool, True where a compressed token may be attended (None: all).
        fp_mask: ``[B, W]`` bool, the same for the full-precision tokens.
        scaling: softmax scale (default ``D ** -0.5``).
        comp_lengths: ``[B]`` integer count of compressed rows in use per sequence (None: all ``N``): for
            preallocated buffers, whose rows past the count hold nothing yet.
        tables: the key and value quantizers' tables on ``q``'s device, when the caller holds them (a compiled
            step then never looks them up).

    Returns ``[B, Hq, D]`` in ``q.dtype``.
    """
    if comp_lengths is not None and k.length:
        in_use = torch.arange(k.length, device=q.device) < comp_lengths.to(q.device).reshape(-1, 1)
        comp_mask = in_use if comp_mask is None else in_use & comp_mask.bool()
    return attend_rotated(q, k, v, k_fp, v_fp, comp_mask, fp_mask, scaling, tables, _rotated_scores, _rotated_mix)


def _rotated_scores(tk: SpectralTables, k: PackedSide, q_rot: torch.Tensor) -> torch.Tensor:
    """``q_rot . z_hat`` ``[B, Hkv, G, N]`` of the compressed keys (scales included)."""
    return torch.einsum("bhge,bhne->bhgn", q_rot, decode_rotated_ref(tk, k.codes, k.scales, k.outliers))


def _rotated_mix(tv: SpectralTables, v: PackedSide, p: torch.Tensor) -> torch.Tensor:
    """``sum_t p_t z_hat_t`` ``[B, Hkv, G, D]`` of the compressed values, in their rotated basis."""
    return torch.einsum("bhgn,bhne->bhge", p, decode_rotated_ref(tv, v.codes, v.scales, v.outliers))


RotatedScores = Callable[[SpectralTables, PackedSide, torch.Tensor], torch.Tensor]
RotatedMix = Callable[[SpectralTables, PackedSide, torch.Tensor], torch.Tensor]


def attend_rotated(q: torch.Tensor, k: PackedSide, v: PackedSide, k_fp: torch.Tensor | None,
                   v_fp: torch.Tensor | None, comp_mask: torch.Tensor | None, fp_mask: torch.Tensor | None,
                   scaling: float | None, tables: tuple[SpectralTables, SpectralTables] | None,
                   rotated_scores: RotatedScores, rotated_mix: RotatedMix) -> torch.Tensor:
    """The decode step of the module docstring, around two pluggable parts: ``rotated_scores(tk, k, q_rot)`` (the
    compressed keys' ``q_rot . z_hat``, ``[B, Hkv, G, N]``) and ``rotated_mix(tv, v, p)`` (the compressed values'
    ``sum_t p_t z_hat_t`` in the rotated basis, ``[B, Hkv, G, D]``). The reference decodes the cache per head;
    :mod:`.cpu_attention` works on the row decoder's grouped columns."""
    b, hq, hkv, d = _check(q, k, v, k_fp, v_fp)
    g = hq // hkv
    scaling = d**-0.5 if scaling is None else float(scaling)
    qf = q.float().view(b, hkv, g, d)
    scores = []
    n = k.length
    if n:
        if tables is None:
            tables = (tables_for(k.quantizer, q.device), tables_for(v.quantizer, q.device))
        tk, tv = tables
        q_rot = torch.einsum("bhgd,hed->bhge", qf, tk.decoder)
        sc = rotated_scores(tk, k, q_rot) + torch.einsum("bhgd,hd->bhg", qf, tk.mean)[..., None]
        pos_sc = position_scores(qf, k)
        if pos_sc is not None:
            sc = sc + pos_sc
        sc = sc * scaling
        if comp_mask is not None:
            sc = sc.masked_fill(~comp_mask[:, None, None, :].bool(), float("-inf"))
        scores.append(sc)
    if k_fp is not None and k_fp.shape[2]:
        sw = torch.einsum("bhgd,bhwd->bhgw", qf, k_fp.float()) * scaling
        if fp_mask is not None:
            sw = sw.masked_fill(~fp_mask[:, None, None, :].bool(), float("-inf"))
        scores.append(sw)
    if not scores:
        raise ValueError("no tokens to attend to.")
    p = torch.softmax(torch.cat(scores, -1), dim=-1)
    out = torch.zeros(b, hkv, g, d, dtype=torch.float32, device=q.device)
    if n:
        pc = p[..., :n]
        out += torch.einsum("bhge,hed->bhgd", rotated_mix(tv, v, pc), tv.decoder)
        out += pc.sum(-1, keepdim=True) * tv.mean[None, :, None, :]
    if p.shape[-1] > n:
        out += torch.einsum("bhgw,bhwd->bhgd", p[..., n:], v_fp.float())
    return out.reshape(b, hq, d).to(q.dtype)
