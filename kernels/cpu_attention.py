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

from .layout import SpectralTables, tables_for
from .ref import PackedSide, _check, position_scores


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
    b, hq, hkv, d = _check(q, k, v, k_fp, v_fp)
    g = hq // hkv
    scaling = d**-0.5 if scaling is None else float(scaling)
    qf = q.float().view(b, hkv, g, d)
    n = k.length
    scores = []
    if n:
        tk, tv = tables_for(k.quantizer, q.device), tables_for(v.quantizer, q.device)
        q_rot = torch.einsum("bhgd,hed->bhge", qf, tk.decoder)
        sc = torch.bmm(_grouped(tk, k), _block_queries(tk, q_rot)).view(b, n, hkv, g)
        if k.scales is not None:
            sc = sc * k.scales.float().unsqueeze(-1)
        sc = sc.permute(0, 2, 3, 1) + torch.einsum("bhgd,hd->bhg", qf, tk.mean)[..., None]
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
        weights = pc if v.scales is None else pc * v.scales.float().transpose(1, 2).unsqueeze(2)
        mixed = torch.bmm(weights.reshape(b, hkv * g, n), _grouped(tv, v)).view(b, hkv, g, hkv * d)
        own = tv.rows.order.view(hkv, d)[None, :, None, :].expand(b, hkv, g, d)  # each head's own columns
        out += torch.einsum("bhge,hed->bhgd", torch.gather(mixed, 3, own), tv.decoder)
        out += pc.sum(-1, keepdim=True) * tv.mean[None, :, None, :]
    if p.shape[-1] > n:
        out += torch.einsum("bhgw,bhwd->bhgd", p[..., n:], v_fp.float())
    return out.reshape(b, hq, d).to(q.dtype)
