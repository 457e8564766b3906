"""Per-token scale formats: the log8 codec (levels, boundaries, clamping), quantizers and caches storing one byte
per scale, and calibrations choosing it, saving and loading it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from spectralkv import codebook as cb
from spectralkv.config import SpectralKVConfig
from spectralkv.quantizer import SpectralQuantizer
from spectralkv.scales import FP16, LOG8_LEVELS, SCALE_FLOOR, ScaleCodec, check_scale_format, measured_range


def test_fp16_codec_is_the_rms_in_fp16() -> None:
    ms = torch.rand(5, 7) * 9 + 1e-3
    stored = FP16.encode_mean_square(ms)
    assert stored.dtype == torch.float16 and FP16.bits == 16
    assert torch.equal(stored, ms.sqrt().clamp_min(SCALE_FLOOR).half())
    assert torch.equal(FP16.values(stored), stored.float())
    assert FP16.encode_mean_square(torch.zeros(1)).item() > 0  # a token at the mean never divides by zero


def test_log8_levels_and_rounding() -> None:
    codec = ScaleCodec("log8", (-4.0, 4.0))
    bounds, levels = codec.tables("cpu")
    assert codec.bits == 8 and codec.dtype == torch.uint8
    assert levels.shape == bounds.shape == (LOG8_LEVELS,) and math.isinf(bounds[-1])
    assert torch.allclose(levels[[0, -1]].log2(), torch.tensor([-4.0, 4.0]))
    assert (levels.diff() > 0).all() and (bounds[:-1].diff() > 0).all()
    rms = torch.logspace(-3.9, 3.9, 2001, base=2.0)  # inside the range: within half a level (in log2)
    got = codec.quantized(rms.pow(2))
    half_level = 8.0 / 255 / 2
    assert ((got.log2() - rms.log2()).abs() <= half_level + 1e-6).all()
    # the stored level is the count of boundaries below the mean square, the same rule the Triton kernel uses
    stored = codec.encode_mean_square(rms.pow(2))
    assert torch.equal(stored.long(), (bounds[None, :-1] < rms.pow(2)[:, None]).sum(-1))
    assert stored.dtype == torch.uint8
    # beyond the range the scale clamps to the end levels; zero and NaN-free
    out = codec.quantized(torch.tensor([0.0, 1e-30, 2.0**20]))
    assert torch.equal(out, levels[[0, 0, -1]])


@pytest.mark.parametrize("bad", [(1.0, 1.0), (2.0, -1.0), (float("nan"), 1.0), (0.0, float("inf")), None,
                                 (0.0, 1.0, 2.0)])
def test_log8_needs_a_finite_increasing_range(bad: Any) -> None:
    with pytest.raises(ValueError, match="range"):
        ScaleCodec("log8", bad)


def test_bad_formats_refused() -> None:
    with pytest.raises(ValueError, match=r"one of \('fp16', 'log8'\), got 'int4'"):
        check_scale_format("int4")
    with pytest.raises(ValueError, match="takes no range"):
        ScaleCodec("fp16", (0.0, 1.0))


def test_measured_range_covers_the_scales_with_margin() -> None:
    rms = torch.tensor([0.25, 1.0, 3.0])
    lo, hi = measured_range(rms, margin=1.0).tolist()
    assert lo == pytest.approx(-3.0) and hi == pytest.approx(math.log2(3.0) + 1.0)
    lo, hi = measured_range(torch.full((4,), 2.0)).tolist()  # one distinct scale: still a valid range
    assert hi > lo


def _quantizer(scale_range: tuple[float, float] | None, seed: int = 0) -> SpectralQuantizer:
    g = torch.Generator().manual_seed(seed)
    h, d = 2, 32
    basis = torch.linalg.qr(torch.randn(h, d, d, generator=g, dtype=torch.float64))[0].float()
    lam = torch.linspace(4.0, 0.05, d).expand(h, d).contiguous()
    bits = torch.full((h, d), 3, dtype=torch.uint8)
    return SpectralQuantizer(torch.zeros(h, d), basis, lam, cb.fit_codebooks(torch.randn(8192, generator=g)), bits,
                             True, scale_range=scale_range)


def test_log8_quantizer_stores_a_byte_and_decodes_like_fp16() -> None:
    """One byte per token and head instead of two; the reconstruction error is that of the codes, not the scale."""
    q8, q16 = _quantizer((-4.0, 4.0)), _quantizer(None)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 2, 50, 32, generator=g) * torch.logspace(-2, 2, 50, base=2.0)[None, None, :, None]
    x = torch.einsum("bhte,hed->bhtd", z, q8.decoder)  # standardised coordinates z, as calibrated
    p8, s8 = q8.encode(x)
    p16, s16 = q16.encode(x)
    assert s8.dtype == torch.uint8 and s16.dtype == torch.float16 and s8.shape == s16.shape == (2, 50, 2)
    assert q8.bits_per_token == q16.bits_per_token - 8 * 2 and q8.scale_bits_per_token == 16
    y8, y16 = q8.decode(p8, s8, torch.float32), q16.decode(p16, s16, torch.float32)
    err8, err16 = ((y8 - x).pow(2).sum() / x.pow(2).sum()).item(), ((y16 - x).pow(2).sum() / x.pow(2).sum()).item()
    assert err8 < err16 * 1.05, (err8, err16)
    assert torch.equal(q8.fake_quantize(x), y8)  # the calibration's shortcut gives the cache's numbers
    with pytest.raises(ValueError, match="token_scale=False"):
        SpectralQuantizer(q8.mean, torch.eye(32).expand(2, 32, 32), torch.ones(2, 32), q8.codebooks,
                          torch.full((2, 32), 3, dtype=torch.uint8), False, scale_range=(0.0, 1.0))


@pytest.fixture(scope="module")
def log8_calibration(tiny_llama: torch.nn.Module) -> SpectralKVConfig:
    """A calibration that must keep per-token scales (outliers off, the scale option alone), stored as log8."""
    from conftest import tiny_calibrate

    return tiny_calibrate(tiny_llama, outlier_thresholds=(None,), profile_budgets=(), scale_format="log8")


def _scaled(cfg: SpectralKVConfig) -> SpectralKVConfig:
    """``cfg`` with per-token scales on (whatever its search chose), served at 2.5 bits so the allocation pays for
    them."""
    import dataclasses

    return dataclasses.replace(cfg, token_scale=True, bits=2.5)


def test_calibration_records_ranges_and_round_trips(log8_calibration: SpectralKVConfig, tmp_path: Path,
                                                    tiny_llama: torch.nn.Module) -> None:
    cfg = log8_calibration
    assert cfg.scale_format == "log8"
    for (layer, kind), q in _scaled(cfg).quantizers().items():
        lo, hi = cfg.tensor(layer, kind, "scale_range").tolist()
        assert lo < hi and q.scale_codec.log_range == pytest.approx((lo, hi))
        assert q.scale_dtype == torch.uint8 and q.scale_bits_per_token == 8 * cfg.num_kv_heads
    assert _scaled(cfg).effective_bits() <= 2.5
    back = SpectralKVConfig.from_pretrained(cfg.save_pretrained(tmp_path), model=tiny_llama)
    assert back.scale_format == "log8" and back.token_scale == cfg.token_scale
    assert back.effective_bits() == cfg.effective_bits() <= cfg.default_bits
    assert "scale_format" in back.measured["chosen"]


def test_cache_with_log8_scales_matches_fake_quantize(log8_calibration: SpectralKVConfig,
                                                      tiny_llama: torch.nn.Module) -> None:
    """Forced per-token log8 scales through the cache: one byte per scale in the store, and the decoded keys equal
    the quantizer's fake quantization."""
    from spectralkv.cache import SpectralKVCache

    cfg = _scaled(log8_calibration)
    cache = SpectralKVCache(tiny_llama.config, cfg, window=0, sink_tokens=0)
    layer = cfg.compressed_layers[0]
    h, d = cfg.num_kv_heads, cfg.head_dim
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, h, 20, d, generator=g), torch.randn(1, h, 20, d, generator=g)
    cache.update(k, v, layer)
    store = cache.layers[layer].key_store
    assert store.scales.view().dtype == torch.uint8 and store.scales.view().shape == (1, 20, h)
    q = cfg.quantizers()[(layer, "k")]
    positions = torch.arange(20)[None] if q.position_centred else None
    torch.testing.assert_close(store.decode(torch.float32), q.fake_quantize(k, positions=positions), rtol=1e-5,
                               atol=1e-5)


def test_calibrate_refuses_an_unknown_scale_format(tiny_llama: torch.nn.Module) -> None:
    from conftest import tiny_calibrate

    with pytest.raises(ValueError, match="scale format must be one of"):
        tiny_calibrate(tiny_llama, scale_format="fp8")
