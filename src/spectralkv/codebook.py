"""Lloyd-Max scalar codebooks fitted to data (1-D k-means), one per bit width 1..8.

Why data-fit: the rotated, standardised key/value coordinates are not Gaussian (heavy tails, skew in the leading
eigen-directions), so a codebook fitted to the measured coordinates has lower distortion than a Gaussian one.
"""

from __future__ import annotations

import torch

MAX_BITS = 8
CODEBOOK_SIZE = 2**MAX_BITS


def lloyd_max(samples: torch.Tensor, bits: int, iters: int = 200) -> torch.Tensor:
    """Fit ``2**bits`` sorted centroids minimising mean squared error on 1-D ``samples``.

    Classic Lloyd iterations (cells at midpoints, centroids at conditional means), run on the sorted samples with
    prefix sums so each iteration costs ``O(k log n)``. Starts from quantiles; empty cells keep their centroid.
    """
    x = samples.detach().reshape(-1).to(torch.float64).sort().values
    k = 2**bits
    n = x.numel()
    if n < k:
        raise ValueError(f"Need at least {k} samples to fit a {bits}-bit codebook, got {n}.")
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), x.cumsum(0)])
    c = x[((torch.arange(k, dtype=torch.float64) + 0.5) / k * n).long().clamp(max=n - 1)]
    for _ in range(iters):
        edges = torch.searchsorted(x, (c[1:] + c[:-1]) / 2)  # first index of each cell but the first
        lo = torch.cat([torch.zeros(1, dtype=torch.long), edges])
        hi = torch.cat([edges, torch.tensor([n])])
        cnt = (hi - lo).to(torch.float64)
        new = torch.where(cnt > 0, (prefix[hi] - prefix[lo]) / cnt.clamp_min(1), c).sort().values
        if torch.equal(new, c):
            break
        c = new
    return c.to(torch.float32)


def fit_codebooks(samples: torch.Tensor) -> torch.Tensor:
    """Return a ``[MAX_BITS, CODEBOOK_SIZE]`` table: row ``b-1`` holds the ``2**b`` centroids of the b-bit codebook,
    padded by repeating its largest centroid (padding is never referenced by a valid code)."""
    table = torch.empty(MAX_BITS, CODEBOOK_SIZE, dtype=torch.float32)
    for b in range(1, MAX_BITS + 1):
        c = lloyd_max(samples, b)
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


def distortion_table(u: torch.Tensor, table: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Measured mean squared error per coordinate for bit widths 0..8, in the standardised domain.

    ``u``: ``[..., N, D]`` coordinates as the codebook sees them (standardised, and divided by the per-token scale
    when one is used); ``scale``: ``[..., N, 1]`` per-token scales or None. The error of one element is
    ``(scale * (u - Q(u)))**2``. Returns ``[..., D, MAX_BITS + 1]``; column 0 (no bits: decode to the mean) is the
    mean of ``(scale * u)**2``.
    """
    s2 = None if scale is None else scale.pow(2)

    def mean(err: torch.Tensor) -> torch.Tensor:
        return (err if s2 is None else err * s2).mean(-2)

    out = [mean(u.pow(2))]
    for b in range(1, MAX_BITS + 1):
        uq = dequantize(quantize(u, table, b), table, b, u.dtype)
        out.append(mean((u - uq).pow(2)))
    return torch.stack(out, -1)
