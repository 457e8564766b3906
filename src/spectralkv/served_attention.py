"""Attention as the cache serves it, for measuring quantization error on held-out text.

Query ``i`` sees quantized keys/values ``j <= i - window`` and the exact ones ``i - window < j <= i`` (the recent
window the cache keeps in full precision). Written as one masked SDPA over ``[quantized, exact]`` keys this costs
``2T x T`` scores per head, four times causal attention, and it dominated calibration at 2048-token sequences. The
fast path splits it exactly: a shifted causal SDPA over the quantized keys (which returns its log-sum-exp) plus the
``window``-wide band of exact keys, merged by log-sum-exp like the decode kernel merges its splits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# CPU's fused attention returns the log-sum-exp the merge needs; no public SDPA does (checked on torch 2.13).
_CPU_ATTENTION_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def serving_mask(t: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """``[T, 2T]`` bool: which of ``[quantized keys, exact keys]`` query ``i`` sees when served with a recent window
    of ``window`` exact tokens: exact for ``i - window < j <= i``, quantized for ``j <= i - window``."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    return torch.cat([j <= i - window, (j <= i) & (j > i - window)], dim=1)


def served_attention_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_hat: torch.Tensor,
                            v_hat: torch.Tensor, scaling: float, window: int) -> torch.Tensor:
    """``[S, Hq, T, D]`` served attention as one masked SDPA (any device; the reference for the fast path)."""
    return F.scaled_dot_product_attention(q, torch.cat([k_hat, k], 2), torch.cat([v_hat, v], 2),
                                          attn_mask=serving_mask(q.shape[2], window, q.device), scale=scaling,
                                          enable_gqa=True)


def _band_blocks(x: torch.Tensor, w: int, nb: int) -> torch.Tensor:
    """``[S, H, nb, 2w, D]``: block ``b`` holds positions ``b*w - w .. b*w + w - 1`` (zeros before position 0)."""
    x = F.pad(x, (0, 0, w, nb * w - x.shape[2]))
    return x.unfold(2, 2 * w, w).transpose(-1, -2)


def served_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_hat: torch.Tensor, v_hat: torch.Tensor,
                     scaling: float, window: int) -> torch.Tensor:
    """``[S, Hq, T, D]`` attention of ``q`` ``[S, Hq, T, D]`` over quantized ``k_hat``/``v_hat`` and exact ``k``/``v``
    ``[S, H, T, D]`` (GQA: ``Hq`` a multiple of ``H``), each query seeing its last ``window`` tokens exactly."""
    if window <= 0:
        return F.scaled_dot_product_attention(q, k_hat, v_hat, is_causal=True, scale=scaling, enable_gqa=True)
    if _CPU_ATTENTION_WITH_LSE is None or q.device.type != "cpu" or q.dtype != torch.float32:
        return served_attention_masked(q, k, v, k_hat, v_hat, scaling, window)
    s, hq, t, d = q.shape
    h, w = k.shape[1], window
    g, nb = hq // h, -(-t // w)  # queries in nb blocks of w (the last one padded)
    # quantized part: query i sees k_hat[: i - w + 1], i.e. causal attention of q[w:] over k_hat[: T - w]
    out_q = q.new_zeros(s, hq, nb * w, d)
    lse_q = q.new_full((s, hq, nb * w), float("-inf"))
    if t > w:
        o, lse = _CPU_ATTENTION_WITH_LSE(q[:, :, w:], k_hat[:, :, : t - w].repeat_interleave(g, 1),
                                         v_hat[:, :, : t - w].repeat_interleave(g, 1), 0.0, True, scale=scaling)
        out_q[:, :, w:t], lse_q[:, :, w:t] = o, lse
    # exact band: the query at position b*w + r sees key slots c of block b with r < c <= r + w
    qb = F.pad(q, (0, 0, 0, nb * w - t)).view(s, h, g, nb, w, d)
    kb, vb = _band_blocks(k, w, nb), _band_blocks(v, w, nb)
    r = torch.arange(w, device=q.device)[:, None]
    c = torch.arange(2 * w, device=q.device)[None, :]
    after_start = torch.arange(nb, device=q.device)[:, None, None] * w - w + c >= 0
    scores = torch.einsum("shgbrd,shbcd->shgbrc", qb, kb) * scaling
    scores = scores.masked_fill(~((c > r) & (c <= r + w) & after_start), float("-inf"))
    # merge by log-sum-exp (every query sees itself, so the band is never empty)
    lse_q = lse_q.view(s, h, g, nb, w)
    top = torch.maximum(scores.amax(-1), lse_q)
    p_band = (scores - top[..., None]).exp()
    p_q = (lse_q - top).exp()
    out = p_q[..., None] * out_q.view(s, h, g, nb, w, d) + torch.einsum("shgbrc,shbcd->shgbrd", p_band, vb)
    out = out / (p_q + p_band.sum(-1))[..., None]
    return out.reshape(s, hq, nb * w, d)[:, :, :t]
