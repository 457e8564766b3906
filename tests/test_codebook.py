"""Lloyd-Max codebooks: optimality conditions, known Gaussian values, the padded table, and measured distortion."""

from __future__ import annotations

import math

import pytest
import torch

from spectralkv import codebook as cb


@pytest.fixture(scope="module")
def gaussian() -> torch.Tensor:
    return torch.randn(200_000, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def skewed() -> torch.Tensor:
    """Heavy-tailed and skewed, like the leading key coordinates: a data-fit codebook must not assume symmetry."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(30_000, generator=g).exp() - 1.0


@pytest.fixture(scope="module")
def table(skewed: torch.Tensor) -> torch.Tensor:
    return cb.fit_codebooks(skewed)


def _nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Brute-force nearest-centroid index (reference for ``quantize``)."""
    return (x.unsqueeze(-1) - c).abs().argmin(-1)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_centroids_are_sorted_conditional_means(skewed: torch.Tensor, bits: int) -> None:
    """Lloyd's optimality: at convergence each centroid is the mean of the samples nearest to it. With the default
    iteration cap (what calibration uses) Lloyd may stop a little short of the fixed point on skewed data."""
    spread = float(skewed.std())
    for iters, tol in ((5000, 1e-5), (200, 1e-2)):
        c = cb.lloyd_max(skewed, bits, iters=iters).double()
        assert c.shape == (2**bits,)
        assert (c[1:] > c[:-1]).all(), "centroids must be strictly sorted"
        cell = _nearest(skewed.double(), c)
        for j in range(2**bits):
            members = skewed.double()[cell == j]
            assert members.numel() > 0, f"cell {j} is empty"
            assert float(c[j]) == pytest.approx(float(members.mean()), abs=tol * spread), (iters, j)


def test_one_bit_gaussian_known_values(gaussian: torch.Tensor) -> None:
    """For N(0,1) the 1-bit Lloyd-Max quantizer is +-sqrt(2/pi) with MSE 1 - 2/pi."""
    c = cb.lloyd_max(gaussian, 1)
    assert c.tolist() == pytest.approx([-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)], abs=0.01)
    q = c[_nearest(gaussian, c)]
    assert float((gaussian - q).pow(2).mean()) == pytest.approx(1 - 2 / math.pi, abs=0.005)


def test_gaussian_two_bit_known_value(gaussian: torch.Tensor) -> None:
    """Max (1960): the optimal 4-level Gaussian quantizer has MSE 0.1175."""
    c = cb.lloyd_max(gaussian, 2)
    q = c[_nearest(gaussian, c)]
    assert float((gaussian - q).pow(2).mean()) == pytest.approx(0.1175, abs=0.003)


def test_distortion_decreases_with_bits(table: torch.Tensor, skewed: torch.Tensor) -> None:
    dist = cb.distortion_table(skewed.view(1, -1, 1), table)[0, 0]
    assert dist.shape == (cb.MAX_BITS + 1,)
    assert (dist[1:] < dist[:-1]).all(), dist.tolist()
    assert float(dist[8]) < 1e-2 * float(dist[0])


def test_high_rate_gaussian_near_panter_dite() -> None:
    """At 4..8 bits the Lloyd-Max MSE of N(0,1) approaches Panter-Dite, ``(pi * sqrt(3) / 2) * 4**-b``; a codebook
    stuck near its starting point (e.g. quantile starts) is several times worse at 6..8 bits."""
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(2))
    dist = cb.distortion_table(x.view(1, -1, 1), cb.fit_codebooks(x))[0, 0]
    for b in range(4, 9):
        assert float(dist[b]) < 1.1 * (math.pi * math.sqrt(3) / 2) * 4.0**-b, (b, dist.tolist())


def test_heavy_tails_each_extra_bit_divides_error_by_about_four(skewed: torch.Tensor, table: torch.Tensor) -> None:
    """The 6 dB-per-bit rule must hold on skewed heavy-tailed data too (the case data-fit codebooks are for)."""
    dist = cb.distortion_table(skewed.view(1, -1, 1), table)[0, 0]
    for b in range(3, 8):
        assert float(dist[b + 1]) < 0.3 * float(dist[b]), (b, dist.tolist())


def test_lloyd_max_needs_enough_samples() -> None:
    with pytest.raises(ValueError, match="at least 8 samples"):
        cb.lloyd_max(torch.randn(5), 3)


def test_fit_codebooks_table_layout_and_padding(table: torch.Tensor, skewed: torch.Tensor) -> None:
    """Row b-1 holds the 2**b centroids of the b-bit codebook, padded with its largest centroid."""
    assert table.shape == (cb.MAX_BITS, cb.CODEBOOK_SIZE) and table.dtype == torch.float32
    for b in range(1, cb.MAX_BITS + 1):
        k = 2**b
        assert torch.equal(table[b - 1, :k], cb.lloyd_max(skewed, b))
        assert torch.equal(cb.centroids(table, b), table[b - 1, :k])
        assert (table[b - 1, k:] == table[b - 1, k - 1]).all(), f"padding of row {b - 1}"
        bounds = cb.boundaries(table, b)
        assert torch.equal(bounds, (table[b - 1, 1:k] + table[b - 1, : k - 1]) / 2)


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_quantize_picks_nearest_centroid(table: torch.Tensor, bits: int) -> None:
    x = torch.randn(4, 333, generator=torch.Generator().manual_seed(bits)) * 2
    codes = cb.quantize(x, table, bits)
    assert codes.dtype == torch.int64 and int(codes.min()) >= 0 and int(codes.max()) < 2**bits
    c = cb.centroids(table, bits)
    # codes may differ from brute force only on an exact tie, so compare the distances they pick
    picked = (x - c[codes]).abs()
    best = (x - c[_nearest(x, c)]).abs()
    assert torch.equal(picked, best)
    assert torch.equal(cb.dequantize(codes, table, bits, torch.float64), c.double()[codes])


def _direct_distortion(u: torch.Tensor, table: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    s2 = torch.ones_like(u[..., :1]) if scale is None else scale.pow(2)
    cols = [(u.pow(2) * s2).mean(-2)]
    for b in range(1, cb.MAX_BITS + 1):
        c = cb.centroids(table, b)
        cols.append(((u - c[_nearest(u, c)]).pow(2) * s2).mean(-2))
    return torch.stack(cols, -1)


@pytest.mark.parametrize("with_scale", [False, True])
def test_distortion_table_matches_direct_computation(table: torch.Tensor, with_scale: bool) -> None:
    g = torch.Generator().manual_seed(7)
    u = torch.randn(2, 300, 5, generator=g, dtype=torch.float64) * 1.5
    scale = torch.rand(2, 300, 1, generator=g, dtype=torch.float64) * 3 + 0.1 if with_scale else None
    got = cb.distortion_table(u, table, scale)
    assert got.shape == (2, 5, cb.MAX_BITS + 1)
    torch.testing.assert_close(got, _direct_distortion(u, table, scale), rtol=1e-9, atol=1e-12)
    if with_scale:  # the scale must actually enter the result
        assert not torch.allclose(got, cb.distortion_table(u, table, None))
