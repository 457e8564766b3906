"""Exact outlier coordinates (dense-and-sparse): the store decodes exactly what fake quantization predicts, through
appends, tails and batch reordering; the cap bounds the worst case; the accounting is what the buffers hold; the
config reserves the expected bits, round-trips, validates, and can turn outliers off; calibration chooses them by
measured error; the fused cache falls back to the decoding path with a warning."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from test_validate import _edit_json

from spectralkv import SpectralKVConfig
from spectralkv.cache import SpectralKVCache, SpectralStore
from spectralkv.codebook import distortion_table, fit_codebooks
from spectralkv.config import CalibrationFormatError
from spectralkv.quantizer import SpectralQuantizer

H, D = 3, 64
TABLE = fit_codebooks(torch.randn(1 << 14, generator=torch.Generator().manual_seed(0)))


def make_quantizer(threshold: float | None, cap: int | None = None, token_scale: bool = False) -> SpectralQuantizer:
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(H, D, D, generator=g)).Q
    bits = torch.full((H, D), 2, dtype=torch.uint8)
    bits[:, :16], bits[:, -8:] = 4, 0
    return SpectralQuantizer(torch.randn(H, D, generator=g), basis, torch.rand(H, D, generator=g) + 0.5, TABLE, bits,
                             token_scale, threshold, cap)


def heavy_tailed(b: int, t: int, seed: int = 0) -> torch.Tensor:
    """Student-t (3 degrees of freedom) coordinates: the tails a Gaussian-fit codebook handles worst."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, H, t, D, generator=g)
    chi = torch.randn(3, b, H, t, D, generator=g).pow(2).sum(0) / 3
    return z / chi.sqrt()


@pytest.mark.parametrize("token_scale", [False, True])
@pytest.mark.parametrize("cap", [None, 2])
def test_store_decodes_what_fake_quantize_predicts(token_scale: bool, cap: int | None) -> None:
    q = make_quantizer(2.5, cap, token_scale)
    x = heavy_tailed(3, 12)
    store = SpectralStore(q)
    for lo, hi in ((0, 5), (5, 6), (6, 12)):  # a prefill flush, a decode step, a chunk
        store.append(x[:, :, lo:hi])
    expected = q.fake_quantize(x)
    assert store.outliers.entries > 0
    assert torch.equal(store.decode(torch.float32), expected)
    assert torch.equal(store.decode_tail(6, torch.float32), expected[:, :, 6:])
    index = torch.tensor([2, 0, 2, 1])  # reorder and repeat rows (beam search, num_return_sequences)
    store.select_batch(index)
    assert torch.equal(store.decode(torch.float32), expected[index])
    assert torch.equal(store.decode_tail(1, torch.float32), expected[index][:, :, -1:])


def test_outliers_reduce_error_on_heavy_tails() -> None:
    x = heavy_tailed(2, 64)
    plain = (make_quantizer(None).fake_quantize(x) - x).pow(2).mean()
    exact = (make_quantizer(3.0).fake_quantize(x) - x).pow(2).mean()
    assert exact < 0.8 * plain


def test_cap_keeps_the_largest_per_token() -> None:
    q = make_quantizer(1.0, cap=3)
    z = q.rotate(heavy_tailed(2, 8))
    mask = q.outlier_mask(z)
    per_token = mask.sum((1, 3))  # [B, T]
    assert int(per_token.max()) == 3
    beyond = z.abs() > 1.0
    for b in range(2):
        for t in range(8):
            kept = z[b, :, t].abs()[mask[b, :, t]]
            dropped = z[b, :, t].abs()[beyond[b, :, t] & ~mask[b, :, t]]
            if dropped.numel():
                assert kept.min() >= dropped.max()
    assert torch.equal(mask, beyond & mask) and not torch.equal(mask, beyond)


@pytest.mark.parametrize(("threshold", "cap"), [(2.5, None), (1.0, 3), (2.0, 2)])
@pytest.mark.parametrize("token_scale", [False, True])
def test_slot_outliers_are_the_csr_outliers(threshold: float, cap: int | None, token_scale: bool) -> None:
    """Fixed slots (the static cache) hold the same exact coordinates as the CSR entries, with or without the cap
    binding (threshold 1.0 gives many per token), and decode to the same values."""
    from spectralkv.quantizer import SlotOutliers

    q = make_quantizer(threshold, cap, token_scale)
    x = heavy_tailed(2, 9, seed=3)
    packed, scales, csr = q.encode_with_outliers(x)
    packed_s, scales_s, slots = q.encode_with_outliers(x, slots=q.outlier_cap or H * D)
    assert isinstance(slots, SlotOutliers) and torch.equal(packed_s, packed)
    assert (scales is None and scales_s is None) or torch.equal(scales_s, scales)
    assert slots.index.shape == (2, 9, cap or H * D) and slots.counts.dtype == csr.counts.dtype
    assert torch.equal(slots.counts, csr.counts) and int(csr.counts.max()) > 0
    if cap is not None and threshold == 1.0:
        assert int(slots.counts.max()) == cap  # the cap binds
    z = torch.zeros(2, H, 9, D)
    assert torch.equal(q.apply_outliers(z.clone(), slots), q.apply_outliers(z.clone(), csr))
    assert torch.equal(q.decode(packed, scales, torch.float32, slots), q.decode(packed, scales, torch.float32, csr))
    # an index a dead slot may hold never leaks into the result
    poisoned = SlotOutliers(slots.counts, slots.index, torch.where(
        torch.arange(slots.index.shape[-1]) < slots.counts.unsqueeze(-1).long(), slots.values, 1e4))
    assert torch.equal(q.apply_outliers(z.clone(), poisoned), q.apply_outliers(z.clone(), csr))


def test_accounting_is_what_the_buffers_hold() -> None:
    q = make_quantizer(2.0)
    store = SpectralStore(q)
    store.append(heavy_tailed(2, 10))
    e = store.outliers.entries
    assert q.outlier_count_bits == 8 and q.outlier_entry_bits == 24  # 192 coordinates per token: byte-sized index
    assert q.bits_per_token == q.code_bits_per_token + 8
    assert store.bits_per_token() == pytest.approx(q.bits_per_token + 24 * e / 20)
    o = store.outliers.view()
    assert o.counts.dtype == torch.uint8 and o.index.dtype == torch.uint8 and o.values.dtype == torch.float16
    assert int(o.counts.long().sum()) == e
    assert store.memory()["metadata"] == store.outliers.nbytes > 0


def test_quantizer_rejects_bad_outlier_settings() -> None:
    with pytest.raises(ValueError, match="outlier_threshold must be > 0"):
        make_quantizer(0.0)
    with pytest.raises(ValueError, match="outlier_cap must be >= 1"):
        make_quantizer(3.0, cap=0)


def test_distortion_counts_outliers_as_exact() -> None:
    u = heavy_tailed(1, 256)[0]
    plain, exact = distortion_table(u, TABLE), distortion_table(u, TABLE, exact_beyond=3.0)
    assert torch.all(exact <= plain + 1e-7) and float((plain - exact).sum()) > 0


# -- config ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outlier_cal(tiny_llama: torch.nn.Module) -> SpectralKVConfig:
    from conftest import tiny_calibrate

    return tiny_calibrate(tiny_llama, outlier_thresholds=(2.5,))


def test_config_reserves_expected_outlier_bits(outlier_cal: SpectralKVConfig) -> None:
    cfg = outlier_cal
    assert cfg.outlier_threshold == 2.5 and 0 < cfg.outlier_fraction < 0.2
    coords = cfg.num_kv_heads * cfg.head_dim
    per_token = 8 * 2 * len(cfg.compressed_layers) + cfg.outlier_fraction * cfg.coords_per_token * 24
    assert coords <= 255 and cfg.outlier_bits_per_token == pytest.approx(per_token)
    assert cfg.code_bits_for(3.0) == int(3.0 * cfg.coords_per_token - per_token + 1e-9) - cfg.scale_bits_per_token
    # bits go to groups of ``group_size`` coordinates one bit at a time: at most one group's step is left unspent
    assert 3.0 - cfg.group_size / cfg.coords_per_token < cfg.effective_bits() <= 3.0
    assert cfg.outlier_cap == max(2, math.ceil(4 * cfg.outlier_fraction * coords))
    assert all(q.outlier_threshold == 2.5 and q.outlier_cap == cfg.outlier_cap for q in cfg.quantizers().values())
    off = cfg.without_outliers()
    assert off.outlier_threshold is None and cfg.outlier_threshold == 2.5
    assert off.code_bits_for(3.0) > cfg.code_bits_for(3.0)
    spent = sum(int(t.long().sum()) for t in off.allocation().values())
    assert spent == off.code_bits_for(3.0) and 2.99 < off.effective_bits() <= 3.0


def test_config_round_trip_and_validation(outlier_cal: SpectralKVConfig, tmp_path: Path) -> None:
    folder = outlier_cal.save_pretrained(tmp_path / "skv")
    back = SpectralKVConfig.from_pretrained(folder)
    assert (back.outlier_threshold, back.outlier_fraction) == (outlier_cal.outlier_threshold,
                                                               outlier_cal.outlier_fraction)
    assert "exact outlier coordinates" in (folder / "README.md").read_text() and "beyond 2.5 std" in (
        folder / "README.md").read_text()
    for edit, match in ((dict(outlier_threshold=-1.0), "outlier_threshold must be positive or null"),
                        (dict(outlier_fraction=1.5), "outlier_fraction in .* re-create it with `spectralkv calibrate`"),
                        (dict(outlier_fraction=True), "outlier_fraction in"),
                        (dict(outlier_threshold="3"), "'outlier_threshold' has the wrong type")):
        _edit_json(folder, lambda d, edit=edit: d.update(edit))
        with pytest.raises(CalibrationFormatError, match=match):
            SpectralKVConfig.from_pretrained(folder)
        outlier_cal.save_pretrained(folder)


def test_calibration_rejects_bad_thresholds(tiny_llama: torch.nn.Module) -> None:
    from conftest import tiny_calibrate

    with pytest.raises(ValueError, match="outlier_thresholds"):
        tiny_calibrate(tiny_llama, outlier_thresholds=(-1.0,))
    with pytest.raises(ValueError, match="outlier_thresholds"):
        tiny_calibrate(tiny_llama, outlier_thresholds=())


def test_calibration_search_records_every_threshold(tiny_llama_calibration: SpectralKVConfig) -> None:
    """The default search tries every candidate threshold (and none) and keeps the lowest held-out error."""
    from spectralkv.calibrate import OUTLIER_THRESHOLDS

    search = tiny_llama_calibration.measured["kv_split_search"]
    assert {row["outlier_threshold"] for row in search} == set(OUTLIER_THRESHOLDS)
    best = min(search, key=lambda row: row["heldout_error"])
    chosen = tiny_llama_calibration.measured["chosen"]
    assert chosen["outlier_threshold"] == best["outlier_threshold"] == tiny_llama_calibration.outlier_threshold
    assert chosen["heldout_error"] == best["heldout_error"]


# -- caches -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cache_with_outliers_fused_matches(tiny_llama: torch.nn.Module, outlier_cal: SpectralKVConfig, backend: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Fused decode attention (reference or Triton kernel) reads the exact outliers: same logits as the unfused
    cache, and every decode step of every layer really ran fused."""
    from spectralkv import fused

    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "triton" and (importlib.util.find_spec("triton") is None or not interpreter):
        pytest.skip("the Triton backend on CPU needs triton and TRITON_INTERPRET=1")
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(0))
    seen: list[int] = []
    attend = fused.DecodeSnapshot.attend

    def counting(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(int(self.keys.outliers.values.numel() + self.values.outliers.values.numel()))
        return attend(self, *args, **kwargs)

    monkeypatch.setattr(fused.DecodeSnapshot, "attend", counting)

    def run(cache: Any) -> torch.Tensor:
        with torch.inference_mode():
            out = tiny_llama(input_ids=ids[:, :50], cache=cache, use_cache=True)
            logits = [out.logits[:, -1]]
            for t in range(50, 60):
                logits.append(tiny_llama(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1])
        return torch.stack(logits)

    plain = SpectralKVCache(tiny_llama, outlier_cal, window=4)
    ref = run(plain)
    assert sum(layer.key_store.outliers.entries for layer in plain.layers) > 0
    previous = fused.enable_fused(tiny_llama)
    try:
        got = run(fused.FusedSpectralKVCache(tiny_llama, outlier_cal, window=4, backend=backend))
    finally:
        tiny_llama.set_attn_implementation(previous)
    assert len(seen) == 10 * tiny_llama.config.num_hidden_layers and min(seen) > 0  # fused, outliers read
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
    exact = run(SpectralKVCache(tiny_llama, outlier_cal.with_bits(8.0), window=4))
    assert not torch.equal(ref, exact)  # compression is active
