"""The fast served attention (causal part + exact band, merged by log-sum-exp) equals the one masked SDPA."""

from __future__ import annotations

import pytest
import torch

from spectralkv import served_attention as sa


@pytest.mark.parametrize(("t", "window", "heads", "kv_heads"), [
    (64, 8, 4, 2),    # T a multiple of the window
    (50, 8, 3, 3),    # ragged last block, no GQA
    (37, 32, 9, 3),   # SmolLM2's GQA (3) and window, short sequence
    (8, 8, 2, 1),     # window == T: nothing quantized is in view
    (5, 16, 2, 1),    # window > T
    (40, 1, 8, 1),    # window 1: only the token itself is exact
])
def test_fast_path_equals_the_masked_reference(t: int, window: int, heads: int, kv_heads: int) -> None:
    torch.manual_seed(t + window)
    q = torch.randn(2, heads, t, 16) * 2  # scaled up so softmax is peaked and the merge is exercised
    k, v = torch.randn(2, kv_heads, t, 16), torch.randn(2, kv_heads, t, 16)
    kh, vh = k + 0.5 * torch.randn_like(k), v + 0.5 * torch.randn_like(v)
    want = sa.served_attention_masked(q, k, v, kh, vh, 0.25, window)
    got = sa.served_attention(q, k, v, kh, vh, 0.25, window)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    # the exact tokens carry weight: a different answer if the band were quantized too
    assert not torch.allclose(got, torch.nn.functional.scaled_dot_product_attention(
        q, kh, vh, is_causal=True, scale=0.25, enable_gqa=True), atol=1e-3)


def test_no_window_is_causal_attention_over_the_quantized_cache() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 20, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    kh, vh = k + 0.3, v - 0.3
    want = torch.nn.functional.scaled_dot_product_attention(q, kh, vh, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(sa.served_attention(q, k, v, kh, vh, 0.3, 0), want)


def test_other_dtypes_take_the_masked_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """float64 (and non-CPU devices) have no log-sum-exp SDPA here: the masked reference answers, same numbers."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 30, 8).double(), torch.randn(1, 1, 30, 8).double(), torch.randn(1, 1, 30, 8).double()
    kh, vh = k + 0.2, v + 0.2
    calls: list[int] = []
    real = sa.served_attention_masked
    monkeypatch.setattr(sa, "served_attention_masked", lambda *a: calls.append(1) or real(*a))
    out = sa.served_attention(q, k, v, kh, vh, 0.3, 4)
    assert calls == [1] and out.dtype == torch.float64
    fast = sa.served_attention(q.float(), k.float(), v.float(), kh.float(), vh.float(), 0.3, 4)
    assert calls == [1]  # float32 on CPU took the fast path
    torch.testing.assert_close(fast, out.float(), atol=1e-5, rtol=1e-5)
