"""Lloyd-Max scalar codebooks fitted to data (1-D k-means), one per bit width 1..8.

Why data-fit: the rotated, standardised key/value coordinates are not Gaussian (heavy tails, skew in the leading
eigen-directions), so a codebook fitted to the measured coordinates has lower distortion than a Gaussian one.
"""

from __future__ import annotations

import torch

MAX_BITS = 8
CODEBOOK_SIZE = 2**MAX_BITS


def _cells(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last index of each centroid's cell (cells split at midpoints) in sorted ``x``."""
    edges = torch.searchsorted(x, (c[1:] + c[:-1]) / 2)  # first index of each cell but the first
    lo = torch.cat([torch.zeros(1, dtype=torch.long), edges])
    hi = torch.cat([edges, torch.tensor([x.numel()])])
    return lo, hi


def _means(prefix: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Mean of sorted samples ``lo:hi`` per cell (from prefix sums); ``fallback`` for empty cells."""
    cnt = (hi - lo).to(torch.float64)
    return torch.where(cnt > 0, (prefix[hi] - prefix[lo]) / cnt.clamp_min(1), fallback)


def _fit_sorted(samples: torch.Tensor, max_bits: int, iters: int) -> list[torch.Tensor]:
    """Lloyd-Max codebooks for 1..max_bits bits, each started by splitting every cell of the previous one at its
    centroid (LBG splitting). Why not start from quantiles: Lloyd moves centroids very slowly at high bit widths
    and stops at a local optimum near its start, and quantiles are far from the optimal point density
    (``p^(1/3)``): measured 3x the optimal MSE at 8 bits on Gaussian data, 50x on heavy tails."""
    x = samples.detach().reshape(-1).to(torch.float64).sort().values
    n = x.numel()
    if n < 2**max_bits:
        raise ValueError(f"Need at least {2**max_bits} samples to fit a {max_bits}-bit codebook, got {n}.")
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), x.cumsum(0)])
    out: list[torch.Tensor] = []
    c = x[n // 2 : n // 2 + 1]  # the 0-bit "codebook": a point that splits the data at the median
    for _ in range(max_bits):
        lo, hi = _cells(x, c)
        mid = torch.searchsorted(x, c).clamp(min=lo, max=hi)
        c = torch.stack([_means(prefix, lo, mid, c), _means(prefix, mid, hi, c)], 1).reshape(-1).sort().values
        for _ in range(iters):
            lo, hi = _cells(x, c)
            new = _means(prefix, lo, hi, c).sort().values
            if torch.equal(new, c):
                break
            c = new
        out.append(c.to(torch.float32))
    return out


def lloyd_max(samples: torch.Tensor, bits: int, iters: int = 200) -> torch.Tensor:
    """Fit ``2**bits`` sorted centroids minimising mean squared error on 1-D ``samples``.

    Classic Lloyd iterations (cells at midpoints, centroids at conditional means), run on the sorted samples with
    prefix sums so each iteration costs ``O(k log n)``; at most ``iters`` per bit width. Starts from the codebook
    one bit smaller, split (see :func:`_fit_sorted`); empty cells keep their centroid.
    """
    return _fit_sorted(samples, bits, iters)[-1]


def fit_codebooks(samples: torch.Tensor) -> torch.Tensor:
    """Return a ``[MAX_BITS, CODEBOOK_SIZE]`` table: row ``b-1`` holds the ``2**b`` centroids of the b-bit codebook,
    padded by repeating its largest centroid (padding is never referenced by a valid code)."""
    table = torch.empty(MAX_BITS, CODEBOOK_SIZE, dtype=torch.float32)
    for b, c in enumerate(_fit_sorted(samples, MAX_BITS, 200), start=1):
        table[b - 1, : c.numel()] = c
        table[b - 1, c.numel() :] = c[-1]
    return table


def centroids(table: torch.Tensor, bits: int) -> torch.Tensor:
    """The ``2**bits`` valid centroids of a codebook table."""
    return table[bits - 1, : 2**bits]


def boundaries(table: torch.Tensor, bits: int) -> torch.Tensor:
    """Decision boundaries (midpoints) between consecutive centroids of the ``bits``-bit codebook."""
    c = centroids(table, bits)
    return (c[1:] + c[:-1]) / 2


def quantize(x: torch.Tensor, table: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (int64) of the nearest centroid for every element of ``x``."""
    return torch.bucketize(x.contiguous(), boundaries(table, bits).to(x.device, x.dtype))


def dequantize(codes: torch.Tensor, table: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    return centroids(table, bits).to(codes.device, dtype)[codes.long()]


def distortion_table(u: torch.Tensor, table: torch.Tensor, scale: torch.Tensor | None = None,
                     exact_beyond: float | None = None) -> torch.Tensor:
    """Measured mean squared error per coordinate for bit widths 0..8, in the standardised domain.

    ``u``: ``[..., N, D]`` coordinates as the codebook sees them (standardised, and divided by the per-token scale
    when one is used); ``scale``: ``[..., N, 1]`` per-token scales or None. The error of one element is
    ``(scale * (u - Q(u)))**2``. Returns ``[..., D, MAX_BITS + 1]``; column 0 (no bits: decode to the mean) is the
    mean of ``(scale * u)**2``. With ``exact_beyond`` t, elements with ``|u| > t`` are stored exactly (outliers) and
    count as no error.
    """
    s2 = None if scale is None else scale.pow(2)
    keep = None if exact_beyond is None else (u.abs() <= exact_beyond).to(u.dtype)

    def mean(err: torch.Tensor) -> torch.Tensor:
        err = err if s2 is None else err * s2
        return (err if keep is None else err * keep).mean(-2)

    out = [mean(u.pow(2))]
    for b in range(1, MAX_BITS + 1):
        uq = dequantize(quantize(u, table, b), table, b, u.dtype)
        out.append(mean((u - uq).pow(2)))
    return torch.stack(out, -1)
