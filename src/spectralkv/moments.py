"""Streaming first and second moments in float64, per KV head, with constant memory."""

from __future__ import annotations

import torch


class MomentAccumulator:
    """Accumulates count, sum and sum of outer products of ``[H, N, D]`` batches, per head ``H``."""

    def __init__(self, num_heads: int, dim: int) -> None:
        self.count = 0
        self.sum = torch.zeros(num_heads, dim, dtype=torch.float64)
        self.outer = torch.zeros(num_heads, dim, dim, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """``x``: ``[H, N, D]`` (N vectors per head)."""
        x = x.detach().to("cpu", torch.float64)
        self.count += x.shape[1]
        self.sum += x.sum(1)
        self.outer += x.transpose(1, 2) @ x

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    def second_moment(self) -> torch.Tensor:
        """``E[x x^T]`` per head."""
        return self.outer / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        mu = self.mean()
        return self.second_moment() - mu.unsqueeze(-1) * mu.unsqueeze(-2)


def eigh_descending(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors (columns) of symmetric ``[H, D, D]``, largest first."""
    sym = (cov + cov.transpose(-1, -2)) / 2
    lam, vec = torch.linalg.eigh(sym)
    return lam.flip(-1).clamp_min(0), vec.flip(-1)


def participation_ratio(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Effective number of dimensions ``(sum lambda)^2 / sum lambda^2`` per head."""
    lam = eigenvalues.double()
    return lam.sum(-1).pow(2) / lam.pow(2).sum(-1).clamp_min(1e-30)
