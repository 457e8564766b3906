"""Bit allocation by greedy marginal gain (discrete reverse water-filling) over measured distortion.

Coordinates are allocated in groups of ``GROUP_SIZE`` (consecutive in importance order within a head), so every bit
width occupies a whole number of bytes in a packed row and no padding is ever stored. The greedy visits groups in a
fixed order of decreasing marginal gain, so the allocation for a larger budget always contains the allocation for a
smaller one (monotone in the budget), and the same calibration serves any budget.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Mapping

import torch

from .codebook import MAX_BITS

GROUP_SIZE = 8


def check_budget(bits: float) -> float:
    """Validate a budget in bits per coordinate."""
    try:
        b = float(bits)
    except (TypeError, ValueError):
        raise ValueError(f"The bit budget must be a number in (0, 8], got {bits!r}.") from None
    if not 0 < b <= MAX_BITS:
        raise ValueError(f"The bit budget must be in (0, 8] bits per coordinate, got {bits!r}.")
    return b


def groups_of(importance: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """``[H, D]`` importance -> ``[H, D // group_size, group_size]`` coordinate indices, most important first."""
    h, d = importance.shape
    if d % group_size:
        raise ValueError(f"head_dim {d} is not a multiple of the allocation group size {group_size}.")
    order = torch.argsort(importance, dim=-1, descending=True, stable=True)
    return order.view(h, d // group_size, group_size)


def allocate(
    weighted_distortion: Mapping[Hashable, torch.Tensor],
    code_bits: int,
    group_size: int = GROUP_SIZE,
) -> dict[Hashable, torch.Tensor]:
    """Distribute ``code_bits`` (per token, over every block) to coordinates.

    ``weighted_distortion[key]``: ``[H, D, MAX_BITS + 1]``, the distortion of each coordinate at each bit width in
    common units (importance weight x eigenvalue x measured codebook MSE). Returns ``[H, D]`` uint8 bits per key.
    The number of bits spent is ``code_bits`` rounded down to a multiple of ``group_size`` (or every group at 8 bits).
    """
    keys = list(weighted_distortion)
    group_curves: list[torch.Tensor] = []  # [G, MAX_BITS + 1] per block
    group_index: list[torch.Tensor] = []
    for k in keys:
        wd = weighted_distortion[k].to(torch.float64)
        idx = groups_of(wd[..., 0], group_size)  # [H, G, S]
        h, g, s = idx.shape
        gathered = torch.gather(wd, 1, idx.reshape(h, g * s, 1).expand(h, g * s, MAX_BITS + 1))
        group_curves.append(gathered.view(h * g, s, MAX_BITS + 1).sum(1))
        group_index.append(idx)
    curves = torch.cat(group_curves).tolist()
    steps = max(0, int(code_bits) // group_size)
    level = [0] * len(curves)
    heap = [(-(c[0] - c[1]), i) for i, c in enumerate(curves)]
    heapq.heapify(heap)
    for _ in range(steps):
        if not heap:
            break
        _, i = heapq.heappop(heap)
        level[i] += 1
        b = level[i]
        if b < MAX_BITS:
            heapq.heappush(heap, (-(curves[i][b] - curves[i][b + 1]), i))
    out: dict[Hashable, torch.Tensor] = {}
    pos = 0
    levels = torch.tensor(level, dtype=torch.uint8)
    for k, idx in zip(keys, group_index, strict=True):
        h, g, s = idx.shape
        lv = levels[pos : pos + h * g].view(h, g, 1).expand(h, g, s)
        pos += h * g
        bits = torch.zeros(h, g * s, dtype=torch.uint8)
        bits.scatter_(1, idx.reshape(h, g * s), lv.reshape(h, g * s))
        out[k] = bits
    return out
