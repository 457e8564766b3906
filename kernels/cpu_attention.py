"""Decode attention from packed codes for the PyTorch path (CPU, or a GPU without Triton): the numbers of
:func:`.ref.decode_attention_ref`, computed on the row decoder's grouped columns.

The reference decodes each side into ``[B, H, N, D]`` coordinates in packing order: a gather of every coordinate,
then per-head products that copy the cache once more into the layout a batched matmul wants. Here the decoded
``[B, N, H * D]`` rows stay in the decoder's grouped column order (width by width, heads mixed; see
:class:`spectralkv.row_decoder.RowDecoder`) and the query side absorbs the layout instead. The rotated queries are
laid into a block matrix ``[H * D, H * G]`` whose column ``(h, g)`` holds query ``g`` of head ``h`` at the rows of
head ``h``'s coordinates and zeros elsewhere, so the scores are one ``[N, H*D] @ [H*D, H*G]`` product per sequence;
the weighted values are one ``[H*G, N] @ [N, H*D]`` product, of which each head keeps its own columns. Those products
do ``H`` times the useful multiply-adds, little next to decoding the cache with one query per sequence. The per-token
scales multiply the scores and the probabilities, not the cache. Tested equal to the reference to float32 rounding.
"""

from __future__ import annotations

import torch

from spectralkv.quantizer import SlotOutliers

from .layout import SpectralTables
from .ref import PackedSide, attend_rotated


def _grouped(tables: SpectralTables, side: PackedSide) -> torch.Tensor:
    """The side's centroids ``[B, N, H * D]`` in grouped column order, exact outliers written over theirs."""
    if isinstance(side.outliers, SlotOutliers):
        raise TypeError("decode_attention_rows takes the growing caches' outliers (CSR), not fixed slots; use "
                        "decode_attention_ref for a static cache.")
    z = tables.rows.grouped(side.codes)
    o = side.outliers
    if o is not None and o.values.numel():
        rows, toks = o.positions()
        z[rows, toks, tables.rows.order[o.index.long()]] = o.values.to(z.dtype)
    return z


def _block_queries(tables: SpectralTables, q_rot: torch.Tensor) -> torch.Tensor:
    """``[B, H, G, D]`` rotated queries -> ``[B, H * D, H * G]``: row ``j`` (a grouped column of the cache) holds the
    queries of its own head at its coordinate, zeros for the other heads."""
    b, h, g, d = q_rot.shape
    source = tables.rows.source
    per_coordinate = q_rot.permute(0, 1, 3, 2).reshape(b, h * d, g)[:, source]  # [B, H*D, G]
    own_head = (source // d).unsqueeze(1) == torch.arange(h, device=q_rot.device)  # [H*D, H]
    return (per_coordinate.unsqueeze(2) * own_head[None, :, :, None]).reshape(b, h * d, h * g)


def _rotated_scores(tk: SpectralTables, k: PackedSide, q_rot: torch.Tensor) -> torch.Tensor:
    """``q_rot . z_hat`` ``[B, Hkv, G, N]``: one product with the block queries, then the scales."""
    b, h, g, _ = q_rot.shape
    sc = torch.bmm(_grouped(tk, k), _block_queries(tk, q_rot)).view(b, k.length, h, g)
    if k.scales is not None:
        sc = sc * tk.scale_values(k.scales).unsqueeze(-1)
    return sc.permute(0, 2, 3, 1)


def _rotated_mix(tv: SpectralTables, v: PackedSide, p: torch.Tensor) -> torch.Tensor:
    """``sum_t p_t z_hat_t`` ``[B, Hkv, G, D]``: the scales on the probabilities, one product with the grouped rows,
    then each head's own columns."""
    b, h, g, n = p.shape
    d = tv.head_dim
    weights = p if v.scales is None else p * tv.scale_values(v.scales).transpose(1, 2).unsqueeze(2)
    mixed = torch.bmm(weights.reshape(b, h * g, n), _grouped(tv, v)).view(b, h, g, h * d)
    return torch.gather(mixed, 3, tv.rows.order.view(h, d)[None, :, None, :].expand(b, h, g, d))


def decode_attention_rows(
    q: torch.Tensor,
    k: PackedSide,
    v: PackedSide,
    k_fp: torch.Tensor | None = None,
    v_fp: torch.Tensor | None = None,
    comp_mask: torch.Tensor | None = None,
    fp_mask: torch.Tensor | None = None,
    scaling: float | None = None,
) -> torch.Tensor:
    """Same arguments and result as :func:`.ref.decode_attention_ref` (without ``comp_lengths``/``tables``, which
    only the static cache's compiled steps use)."""
    return attend_rotated(q, k, v, k_fp, v_fp, comp_mask, fp_mask, scaling, None, _rotated_scores, _rotated_mix)
