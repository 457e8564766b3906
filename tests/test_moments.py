"""Streaming moments must equal a direct float64 computation; the spectrum helpers must be exact on known input."""

from __future__ import annotations

import pytest
import torch

from spectralkv.moments import MomentAccumulator, eigh_descending, participation_ratio


def _correlated(h: int, n: int, d: int, seed: int) -> torch.Tensor:
    """Non-centred, anisotropic data: a large mean makes the E[xx^T] - mu mu^T cancellation matter."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(h, d, d, generator=g, dtype=torch.float64)
    x = torch.randn(h, n, d, generator=g, dtype=torch.float64) @ mix
    return x + 5.0 * torch.randn(h, 1, d, generator=g, dtype=torch.float64)


def test_accumulator_matches_direct_float64_over_batches() -> None:
    """Several uneven float32 batches accumulate to the same moments as one float64 pass over all the data."""
    h, d = 3, 12
    x = _correlated(h, 1000, d, seed=0)
    acc = MomentAccumulator(h, d)
    for lo, hi in ((0, 1), (1, 250), (250, 251), (251, 777), (777, 1000)):
        acc.update(x[:, lo:hi].float())
    xf = x.float().double()  # what the accumulator saw
    mean = xf.mean(1)
    centred = xf - mean[:, None]
    cov = centred.transpose(1, 2) @ centred / xf.shape[1]
    assert acc.count == 1000
    assert acc.sum.dtype == torch.float64 and acc.outer.dtype == torch.float64
    torch.testing.assert_close(acc.mean(), mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.second_moment(), xf.transpose(1, 2) @ xf / 1000, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(acc.covariance(), cov, rtol=1e-9, atol=1e-9)


def test_accumulator_empty_is_zero_not_nan() -> None:
    """Before any update (e.g. a layer that never fired) the moments are zeros, not a division by zero."""
    acc = MomentAccumulator(2, 4)
    assert torch.equal(acc.mean(), torch.zeros(2, 4, dtype=torch.float64))
    assert torch.equal(acc.covariance(), torch.zeros(2, 4, 4, dtype=torch.float64))


def test_eigh_descending_orthonormal_sorted_and_reconstructs() -> None:
    x = _correlated(4, 500, 16, seed=1)
    acc = MomentAccumulator(4, 16)
    acc.update(x)
    cov = acc.covariance()
    lam, vec = eigh_descending(cov)
    assert lam.shape == (4, 16) and vec.shape == (4, 16, 16)
    assert (lam[:, 1:] <= lam[:, :-1]).all(), "eigenvalues must be sorted largest first"
    assert (lam >= 0).all()
    eye = torch.eye(16, dtype=torch.float64).expand(4, 16, 16)
    torch.testing.assert_close(vec.transpose(1, 2) @ vec, eye, atol=1e-10, rtol=0)
    # columns are eigenvectors of their eigenvalues, in the same order
    torch.testing.assert_close(cov @ vec, vec * lam[:, None, :], atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(vec @ torch.diag_embed(lam) @ vec.transpose(1, 2), cov, atol=1e-8, rtol=1e-8)


def test_eigh_descending_clamps_negative_round_off() -> None:
    """A rank-deficient covariance can come out with tiny negative eigenvalues; they are clamped to zero."""
    v = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    cov = (v.T @ v).unsqueeze(0) - 1e-12 * torch.eye(3, dtype=torch.float64)
    lam, _ = eigh_descending(cov)
    assert (lam >= 0).all()
    assert lam[0, 0] == pytest.approx(14.0)


@pytest.mark.parametrize(
    ("spectrum", "expected"),
    [
        ([1.0, 1.0, 1.0, 1.0], 4.0),  # isotropic: every dimension counts
        ([5.0, 0.0, 0.0, 0.0], 1.0),  # rank one
        ([2.0, 1.0, 1.0, 0.0], 16.0 / 6.0),  # (2+1+1)^2 / (4+1+1)
    ],
)
def test_participation_ratio_known_spectra(spectrum: list[float], expected: float) -> None:
    pr = participation_ratio(torch.tensor([spectrum]))
    assert pr.dtype == torch.float64
    assert float(pr[0]) == pytest.approx(expected, rel=1e-12)


def test_participation_ratio_all_zero_is_finite() -> None:
    assert float(participation_ratio(torch.zeros(1, 8))[0]) == 0.0
