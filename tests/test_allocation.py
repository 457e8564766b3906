"""Bit allocation: exact budget, monotone in the budget, byte-aligned bit widths, and budget validation."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

from spectralkv.allocation import GROUP_SIZE, allocate, check_budget, groups_of
from spectralkv.codebook import MAX_BITS
from spectralkv.config import tensor_name

BUDGETS = (0.25, 0.5, 1.0, 1.5, 2.0, 2.37, 3.0, 4.0, 5.5, 7.9, 8.0)


def _synthetic(h: int = 3, d: int = 32, blocks: int = 3, seed: int = 0) -> dict[Any, torch.Tensor]:
    """Distortion curves ``w * lambda * 4**-b`` with random importance: the shape real measured curves have."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.arange(MAX_BITS + 1, dtype=torch.float64)
    out = {}
    for i in range(blocks):
        scale = torch.rand(h, d, 1, generator=g, dtype=torch.float64).pow(4) * 10 ** (i - 1)
        out[(i, "k" if i % 2 else "v")] = scale * 4.0**-bits
    return out


def _spent(alloc: dict[Any, torch.Tensor]) -> int:
    return sum(int(t.long().sum()) for t in alloc.values())


def _check_byte_aligned(alloc: dict[Any, torch.Tensor]) -> None:
    for key, t in alloc.items():
        assert t.dtype == torch.uint8 and int(t.max()) <= MAX_BITS
        for b in range(1, MAX_BITS + 1):
            counts = (t == b).sum(-1)
            assert not (counts % GROUP_SIZE).any(), f"{key}: {b}-bit counts per head {counts.tolist()}"


@pytest.mark.parametrize("code_bits", [0, 7, 8, 9, 100, 777, 1536, 2303, 2304, 10_000])
def test_allocate_spends_budget_rounded_down_to_groups(code_bits: int) -> None:
    wd = _synthetic()
    alloc = allocate(wd, code_bits)
    total = 8 * sum(t.shape[0] * t.shape[1] for t in wd.values())  # every coordinate at 8 bits
    assert _spent(alloc) == min(code_bits // GROUP_SIZE * GROUP_SIZE, total)
    _check_byte_aligned(alloc)
    assert set(alloc) == set(wd)


def test_allocate_negative_budget_spends_nothing() -> None:
    assert _spent(allocate(_synthetic(), -40)) == 0


def test_allocate_is_monotone_in_the_budget() -> None:
    wd = _synthetic(seed=3)
    previous = None
    for code_bits in range(0, 8 * 3 * 3 * 32 + 1, 104):
        alloc = allocate(wd, code_bits)
        if previous is not None:
            for key in wd:
                assert (alloc[key] >= previous[key]).all(), (code_bits, key)
        previous = alloc


def test_allocate_favours_important_coordinates() -> None:
    """Two groups with 1000x different distortion: the important one gets more bits (reverse water-filling)."""
    curve = 4.0 ** -torch.arange(MAX_BITS + 1, dtype=torch.float64)
    wd = {"x": torch.cat([1000 * curve.expand(1, 8, -1), curve.expand(1, 8, -1)], 1)}
    alloc = allocate(wd, 8 * 8)
    bits = alloc["x"][0]
    assert (bits[:8] == bits[0]).all() and (bits[8:] == bits[8]).all()
    # greedy by hand: gains 1000 * 4**-a vs 4**-b -> A, A, A, A, A, B, A, B: 6 and 2 bits
    assert (int(bits[0]), int(bits[8])) == (6, 2)


def test_groups_of_requires_multiple_of_group_size() -> None:
    with pytest.raises(ValueError, match="head_dim 12 is not a multiple"):
        groups_of(torch.rand(2, 12))
    g = groups_of(torch.tensor([[0.0, 5.0, 1.0, 3.0, 2.0, 7.0, 6.0, 4.0]]), group_size=4)
    assert g.tolist() == [[[5, 6, 1, 7], [3, 4, 2, 0]]]


# -- through the config: the budget as users give it ---------------------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["no_scale", "token_scale"])
def cfg(request: pytest.FixtureRequest, tiny_llama_calibration: Any) -> Any:
    """The tiny calibration with and without per-token scales (the scales change how many code bits a budget buys).

    The stored allocation is authoritative at ``default_bits``, so the variant gets its own, re-allocated one."""
    base = tiny_llama_calibration
    if base.token_scale == request.param:
        return base
    tensors = dict(base.tensors)
    cfg = dataclasses.replace(base, token_scale=request.param, tensors=tensors)
    for (layer, kind), bits in allocate(cfg.weighted_distortion(), cfg.code_bits_for(cfg.default_bits)).items():
        tensors[tensor_name(layer, kind, "bits")] = bits
    return cfg


@pytest.mark.parametrize("bits", BUDGETS)
def test_config_allocation_meets_budget_exactly(cfg: Any, bits: float) -> None:
    if bits < cfg.min_bits:
        with pytest.raises(ValueError, match="too small"):
            cfg.allocation(bits)
        return
    alloc = cfg.allocation(bits)
    code_bits = cfg.code_bits_for(bits)
    assert code_bits == math.floor(bits * cfg.coords_per_token + 1e-9) - cfg.scale_bits_per_token
    assert _spent(alloc) == code_bits // GROUP_SIZE * GROUP_SIZE
    _check_byte_aligned(alloc)
    eff = cfg.effective_bits(bits)
    assert eff == (_spent(alloc) + cfg.scale_bits_per_token) / cfg.coords_per_token
    assert bits - GROUP_SIZE / cfg.coords_per_token < eff <= bits
    assert cfg.bytes_per_token(bits) == eff * cfg.coords_per_token / 8
    for (layer, kind), t in alloc.items():
        assert layer in cfg.compressed_layers and kind in ("k", "v")
        assert t.shape == (cfg.num_kv_heads, cfg.head_dim)


def test_config_allocation_monotone_in_budget(cfg: Any) -> None:
    budgets = [b for b in BUDGETS if b >= cfg.min_bits]
    allocs = [cfg.allocation(b) for b in budgets]
    for lo, hi, b_lo, b_hi in zip(allocs, allocs[1:], budgets, budgets[1:], strict=False):
        for key in lo:
            assert (hi[key] >= lo[key]).all(), f"{key}: allocation at {b_hi} below the one at {b_lo}"


def test_eight_bits_everywhere_at_full_budget(tiny_llama_calibration: Any) -> None:
    alloc = tiny_llama_calibration.allocation(8.0)
    assert all((t == 8).all() for t in alloc.values())


@pytest.mark.parametrize("scale_format,bits", [("fp16", 16), ("log8", 8)])
def test_token_scale_costs_its_bits_per_head(tiny_llama_calibration: Any, scale_format: str, bits: int) -> None:
    """A per-token scale costs 16 bits per head in fp16, 8 as a log8 byte, paid from the codes."""
    tensors = {k: v for k, v in tiny_llama_calibration.tensors.items()
               if scale_format == "log8" or not k.endswith(".scale_range")}
    with_scale = dataclasses.replace(tiny_llama_calibration, token_scale=True, scale_format=scale_format,
                                     tensors=tensors)
    layers, h = len(with_scale.compressed_layers), with_scale.num_kv_heads
    assert with_scale.scale_bits_per_token == bits * 2 * layers * h
    assert with_scale.min_bits == bits / with_scale.head_dim
    assert with_scale.code_bits_for(3.0) == tiny_llama_calibration.code_bits_for(3.0) - bits * 2 * layers * h


@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, 8.01, 9, 100, float("nan"), float("inf"), "abc", "", None, [3]])
def test_check_budget_rejects_with_clear_message(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"bit budget must be .*\(0, 8\]") as info:
        check_budget(bad)
    assert repr(bad) in str(info.value), "the message should echo the bad value"


@pytest.mark.parametrize(("good", "value"), [(8, 8.0), (0.01, 0.01), (3, 3.0), (torch.tensor(2.5), 2.5), ("3", 3.0)])
def test_check_budget_accepts_numbers(good: Any, value: float) -> None:
    """Numeric strings are accepted on purpose: the CLI passes ``--bits`` through ``check_budget`` as a string."""
    out = check_budget(good)
    assert isinstance(out, float) and out == value
