"""Bases shared by several KV heads (``head_group`` > 1): the same quantizer in the model's layout, exact against a
per-head quantizer where the joint basis is block-diagonal, joint RoPE moments, calibration, artifacts, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_calibrate

from spectralkv import SpectralKVConfig, attach
from spectralkv import codebook as cb
from spectralkv.config import CalibrationFormatError, tensor_name
from spectralkv.positions import PositionMoments, position_features, rotate
from spectralkv.quantizer import SpectralQuantizer
from spectralkv.static import StaticSpectralKVCache
from spectralkv.validate import validate_calibration

H, D, G = 4, 16, 2


def _per_head_parts(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(H, D, D, generator=g)).Q
    lam = torch.rand(H, D, generator=g).sort(-1, descending=True).values + 0.1
    bits = torch.tensor([4] * 8 + [2] * 8, dtype=torch.uint8).repeat(H, 1)
    bits[1] = torch.tensor([3] * 8 + [1] * 8)
    return {"mean": torch.randn(H, D, generator=g), "basis": basis, "eigenvalues": lam, "bits": bits,
            "codebooks": cb.fit_codebooks(torch.randn(4096, generator=g))}


def _grouped(parts: dict[str, torch.Tensor], **kwargs: Any) -> SpectralQuantizer:
    """The per-head quantizer's parts as ``H / G`` bases of dimension ``G * D``: block-diagonal bases, means and
    eigenvalues side by side."""
    hb = H // G
    basis = torch.stack([torch.block_diag(*parts["basis"][i * G:(i + 1) * G]) for i in range(hb)])
    return SpectralQuantizer(parts["mean"].reshape(hb, G * D), basis, parts["eigenvalues"].reshape(hb, G * D),
                             parts["codebooks"], parts["bits"].reshape(hb, G * D), head_group=G, **kwargs)


def test_block_diagonal_joint_basis_quantizes_exactly_as_per_head_bases() -> None:
    """A joint basis that does not mix heads codes every coordinate as the per-head quantizer does, and tensors go
    in and out in the model's layout; packed rows, encode/decode and fake_quantize agree."""
    parts = _per_head_parts()
    per_head = SpectralQuantizer(parts["mean"], parts["basis"], parts["eigenvalues"], parts["codebooks"],
                                 parts["bits"], token_scale=False)
    grouped = _grouped(parts, token_scale=False)
    assert (grouped.num_heads, grouped.head_dim, grouped.kv_heads, grouped.kv_head_dim) == (H // G, G * D, H, D)
    assert grouped.row_bytes == per_head.row_bytes
    x = torch.randn(3, H, 11, D) * 2
    ref = per_head.fake_quantize(x)
    out = grouped.fake_quantize(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    packed, scales, outliers = grouped.encode_with_outliers(x)
    assert scales is None and outliers is None
    torch.testing.assert_close(grouped.decode(packed, None, torch.float32), out, atol=1e-6, rtol=1e-6)


def test_grouped_quantizer_with_scales_outliers_and_positions_decodes_what_fake_quantize_says() -> None:
    """One scale per basis and token, outliers indexed over all coordinates, and RoPE centring per head."""
    parts = _per_head_parts(1)
    freqs = torch.cat([1.0 / 10000 ** (torch.arange(0, D, 2) / D)] * 2)  # [D]: per head
    q = _grouped(parts, token_scale=True, outlier_threshold=2.5, scale_range=(-4.0, 4.0),
                 position_mean=torch.randn(H, D), frequencies=freqs)
    x = torch.randn(2, H, 9, D) * 3
    pos = torch.arange(100, 109)
    packed, scales, outliers = q.encode_with_outliers(x, positions=pos)
    assert scales.shape == (2, 9, H // G) and scales.dtype == torch.uint8
    assert outliers is not None and outliers.values.numel() > 0
    dec = q.decode(packed, scales, torch.float32, outliers, positions=pos)
    torch.testing.assert_close(dec, q.fake_quantize(x, positions=pos), atol=1e-5, rtol=1e-5)
    out = torch.empty_like(x)
    assert q.decode(packed, scales, torch.float32, outliers, positions=pos, out=out) is out
    torch.testing.assert_close(out, dec)
    # each head is centred on its own mean plus its own pre-RoPE mean rotated to the token's position
    cos, sin = position_features(pos, freqs[:D])
    expected = parts["mean"][None, :, None] + rotate(q.position_mean[None, :, None], cos, sin)
    torch.testing.assert_close(q.centre(pos, x.device, 1, 9), expected)


@pytest.mark.parametrize("head_group", [0, 3, 1.5])
def test_quantizer_refuses_a_group_that_does_not_divide_the_basis(head_group: Any) -> None:
    parts = _per_head_parts()
    with pytest.raises((ValueError, TypeError)):
        SpectralQuantizer(parts["mean"].reshape(2, 32), torch.eye(32).repeat(2, 1, 1), torch.ones(2, 32),
                          parts["codebooks"], parts["bits"].reshape(2, 32), token_scale=False,
                          head_group=head_group)


def test_joint_position_moments_hold_each_heads_moments_and_their_cross_covariance() -> None:
    """Two heads side by side (``block`` = head_dim): the pre-RoPE mean and residual moments of each head are what
    per-head moments give, and the off-diagonal block is the residuals' cross-covariance."""
    torch.manual_seed(0)
    n = 2000
    freqs = torch.cat([1.0 / 10000 ** (torch.arange(0, D, 2) / D)] * 2)
    pos = torch.arange(n)
    cos, sin = position_features(pos, freqs)
    m_true = torch.randn(2, D) * 3
    shared = torch.randn(n, D)
    noise = torch.stack([shared, 0.6 * shared + 0.8 * torch.randn(n, D)])  # correlated heads
    keys = rotate(m_true[:, None, :], cos, sin) + noise
    joint = PositionMoments(1, 2 * D, freqs, block=D)
    per = PositionMoments(2, D, freqs)
    for chunk in torch.arange(n).split(600):
        joint.update(keys[:, chunk].transpose(0, 1).reshape(1, -1, 2 * D), pos[chunk])
        per.update(keys[:, chunk], pos[chunk])
    jm, jmu, jcov = joint.residual()
    m, mu, cov = per.residual()
    torch.testing.assert_close(jm.reshape(2, D), m)
    torch.testing.assert_close(jmu.reshape(2, D), mu)
    torch.testing.assert_close(jcov[0, :D, :D], cov[0])
    torch.testing.assert_close(jcov[0, D:, D:], cov[1])
    r = keys.double() - rotate(m[:, None, :], cos.double(), sin.double())
    r = r - r.mean(1, keepdim=True)
    torch.testing.assert_close(jcov[0, :D, D:], r[0].T @ r[1] / n, atol=1e-6, rtol=1e-6)
    assert jcov[0, :D, D:].diagonal().mean() > 0.4  # the correlation a per-head basis cannot see
    with pytest.raises(ValueError, match="divide"):
        PositionMoments(1, 2 * D + 2, freqs, block=D)


@pytest.fixture(scope="module")
def grouped_calibration(tiny_llama: torch.nn.Module) -> SpectralKVConfig:
    return tiny_calibrate(tiny_llama, head_group=2, profile_budgets=())


def test_calibration_with_one_basis_per_layer(grouped_calibration: SpectralKVConfig,
                                              tiny_llama: torch.nn.Module) -> None:
    cfg = grouped_calibration
    h, d = cfg.num_kv_heads, cfg.head_dim
    assert (cfg.head_group, cfg.num_bases, cfg.basis_dim) == (2, h // 2, 2 * d)
    for l in cfg.compressed_layers:
        assert cfg.tensor(l, "k", "basis").shape == (h // 2, 2 * d, 2 * d)
        assert cfg.tensor(l, "v", "bits").shape == (h // 2, 2 * d)
        assert cfg.tensor(l, "k", "position_mean").shape == (h, d)  # per head: each head rotates by itself
    # one scale per basis and token: the budget pays for half as many as per head
    if cfg.token_scale:
        assert cfg.scale_bits_per_token == 8 * 2 * len(cfg.compressed_layers) * (h // 2)
    spent = sum(int(b.long().sum()) for b in cfg.allocation().values())
    assert spent <= cfg.bits * cfg.coords_per_token
    from spectralkv.card import render_card
    from spectralkv.inspection import summary_text

    assert f"| bases | one per 2 KV heads ({h // 2} per layer, dimension {2 * d}" in render_card(cfg)
    assert f"bases: one per 2 KV heads ({h // 2} per layer, dimension {2 * d}" in summary_text(cfg)


def test_grouped_calibration_round_trips_validates_and_generates(
        grouped_calibration: SpectralKVConfig, tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    folder = grouped_calibration.save_pretrained(tmp_path / "g2")
    report = validate_calibration(folder, model=tiny_llama)
    assert report.ok, report.format()
    loaded = SpectralKVConfig.from_pretrained(folder)
    assert loaded.head_group == 2
    x = torch.randn(1, loaded.num_kv_heads, 5, loaded.head_dim)
    pos = torch.arange(5)
    for key, q in loaded.quantizers().items():
        p = pos if q.position_centred else None
        torch.testing.assert_close(q.fake_quantize(x, positions=p),
                                   grouped_calibration.quantizers()[key].fake_quantize(x, positions=p))
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 48))
    try:
        attach(tiny_llama, loaded)
        out = tiny_llama.generate(ids, max_new_tokens=6, do_sample=False)
    finally:
        from spectralkv import detach

        detach(tiny_llama)
    assert out.shape == (2, 54)


def test_fused_and_static_caches_refuse_shared_bases(grouped_calibration: SpectralKVConfig,
                                                      tiny_llama: torch.nn.Module) -> None:
    with pytest.raises(NotImplementedError, match="head_group=2"):
        attach(tiny_llama, grouped_calibration, fused=True)
    assert tiny_llama.config._attn_implementation != "spectralkv_fused"  # nothing changed
    from spectralkv.fused import enable_fused

    previous = enable_fused(tiny_llama)
    try:
        with pytest.raises(NotImplementedError, match="--head-group 1"):
            StaticSpectralKVCache(tiny_llama, grouped_calibration, max_cache_len=64)
    finally:
        tiny_llama.set_attn_implementation(previous)


def test_calibrate_refuses_a_group_that_does_not_divide_the_kv_heads(tiny_llama: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match=r"must divide the model's 2 KV heads: one of \[1, 2\], got 3"):
        tiny_calibrate(tiny_llama, head_group=3)


def _edit(folder: Path, **fields: Any) -> None:
    path = folder / "spectralkv_config.json"
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


def test_artifact_with_a_bad_or_inconsistent_group_is_refused(grouped_calibration: SpectralKVConfig,
                                                              tmp_path: Path) -> None:
    folder = grouped_calibration.save_pretrained(tmp_path / "bad")
    _edit(folder, head_group=3)
    with pytest.raises(CalibrationFormatError, match="head_group 3"):
        SpectralKVConfig.from_pretrained(folder)
    _edit(folder, head_group=1)  # divides, but the tensors hold joint bases: shapes disagree
    with pytest.raises(CalibrationFormatError, match=tensor_name(grouped_calibration.compressed_layers[0], "k",
                                                                 "mean").replace(".", r"\.")):
        SpectralKVConfig.from_pretrained(folder)
