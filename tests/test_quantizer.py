"""SpectralQuantizer, the PyTorch reference path: deterministic, exact at the edges (0 and 8 bits), better with more
bits on real keys and values, and a consistent per-token scale path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import ByteTokenizer

from spectralkv import codebook as cb
from spectralkv.capture import capture_attention
from spectralkv.quantizer import SpectralQuantizer
from spectralkv.scales import SCALE_FLOOR
from spectralkv.text import evaluation_tokens


@pytest.fixture(scope="module")
def tiny_kv(tiny_llama: torch.nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    """Real post-RoPE keys and values of the tiny Llama on evaluation text (never seen by calibration)."""
    ids = evaluation_tokens(ByteTokenizer(), "pydoc")[:192].view(1, -1)
    out: dict[tuple[int, str], torch.Tensor] = {}

    def cb_(layer: int, module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        out[(layer, "k")], out[(layer, "v")] = k.detach().clone(), v.detach().clone()

    with torch.inference_mode(), capture_attention(tiny_llama, cb_):
        tiny_llama(input_ids=ids, use_cache=False)
    return out


def _rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).pow(2).sum() / x.pow(2).sum())


def _centred_rel_err(x: torch.Tensor, y: torch.Tensor, centre: torch.Tensor) -> float:
    """Error relative to the variance around the calibration's centre (the part the codes have to carry): ``[H, D]``
    (the mean) or ``[B, H, T, D]`` (what a position-centred quantizer centres each key on)."""
    c = x - (centre[None, :, None] if centre.dim() == 2 else centre)
    return float((x - y).pow(2).sum() / c.pow(2).sum())


def _positions(q: SpectralQuantizer, x: torch.Tensor) -> torch.Tensor | None:
    """The captured tokens' RoPE positions (0..T-1) for a position-centred quantizer (the default calibration's keys
    on a model with RoPE); None for one that centres on the mean alone."""
    return torch.arange(x.shape[2])[None] if q.position_centred else None


def _centre(q: SpectralQuantizer, x: torch.Tensor) -> torch.Tensor:
    return q.centre(_positions(q, x), x.device, x.shape[0], x.shape[2]).expand_as(x)


def test_encode_decode_deterministic(tiny_llama_calibration: Any, tiny_kv: dict) -> None:
    q = tiny_llama_calibration.quantizers()[(0, "k")]
    assert q.position_centred  # the default calibration of a RoPE model: keys centred per position
    x = tiny_kv[(0, "k")]
    pos = _positions(q, x)
    p1, s1 = q.encode(x, pos)
    p2, s2 = q.encode(x.clone(), pos)
    assert torch.equal(p1, p2) and (s1 is None) == (s2 is None)
    if s1 is not None:
        assert torch.equal(s1, s2)
    assert torch.equal(q.decode(p1, s1, torch.float32, positions=pos), q.decode(p2, s2, torch.float32, positions=pos))
    # a freshly built quantizer from the same calibration gives the same bytes
    q2 = tiny_llama_calibration.quantizers()[(0, "k")]
    assert torch.equal(q2.encode(x, pos)[0], p1)


def test_encode_shapes_and_accounting(tiny_llama_calibration: Any, tiny_kv: dict) -> None:
    cfg = tiny_llama_calibration
    for (layer, kind), q in cfg.quantizers().items():
        x = tiny_kv[(layer, kind)]
        packed, scales = q.encode(x, _positions(q, x))
        b, h, t, _ = x.shape
        assert packed.shape == (b, t, q.row_bytes) and packed.dtype == torch.uint8
        bits = cfg.allocation()[(layer, kind)]
        assert q.code_bits_per_token == int(bits.long().sum()) == 8 * q.row_bytes
        assert q.bits_per_token == q.code_bits_per_token + (q.scale_codec.bits * h if cfg.token_scale else 0)
        assert q.decode(packed, scales, torch.bfloat16, positions=_positions(q, x)).dtype == torch.bfloat16


def _quantizer(bits: torch.Tensor, token_scale: bool, seed: int = 0) -> tuple[SpectralQuantizer, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, d = bits.shape
    basis = torch.linalg.qr(torch.randn(h, d, d, generator=g, dtype=torch.float64))[0].float()
    lam = torch.linspace(4.0, 0.05, d).expand(h, d).contiguous()
    mean = torch.randn(h, d, generator=g) * 3
    table = cb.fit_codebooks(torch.randn(8192, generator=g))
    q = SpectralQuantizer(mean, basis, lam, table, bits, token_scale)
    z = torch.randn(2, h, 7, d, generator=g) * lam.sqrt()[None, :, None]
    x = mean[None, :, None] + torch.einsum("bhte,hde->bhtd", z, basis)
    return q, x


@pytest.mark.parametrize("token_scale", [False, True])
def test_zero_bits_decode_to_the_mean(token_scale: bool) -> None:
    q, x = _quantizer(torch.zeros(2, 16, dtype=torch.uint8), token_scale)
    packed, scales = q.encode(x)
    assert q.row_bytes == 0 and packed.shape == (2, 7, 0)
    out = q.decode(packed, scales, torch.float32)
    torch.testing.assert_close(out, q.mean[None, :, None].expand_as(x), rtol=0, atol=1e-5)


def test_zero_bit_coordinates_decode_to_zero_in_the_rotated_domain() -> None:
    bits = torch.zeros(2, 16, dtype=torch.uint8)
    bits[:, :8] = 3  # the 8 leading eigen-directions get 3 bits, the rest none
    q, x = _quantizer(bits, token_scale=False)
    z = q.decode_rotated(*q.encode(x))
    assert (z[..., 8:] == 0).all() and (z[..., :8] != 0).any()
    # in the output, the 0-bit eigen-directions carry exactly the mean's component
    out = q.decode(*q.encode(x), torch.float32)
    assert q.rotate(out)[..., 8:].abs().max() < 1e-4


@pytest.mark.parametrize("token_scale", [False, True])
def test_eight_bits_everywhere_reconstructs(token_scale: bool) -> None:
    q, x = _quantizer(torch.full((2, 16), 8, dtype=torch.uint8), token_scale)
    y = q.fake_quantize(x)
    assert _centred_rel_err(x, y, q.mean) < 1e-3


def test_eight_bits_on_real_keys_and_values(tiny_llama_calibration: Any, tiny_kv: dict) -> None:
    for key, q in tiny_llama_calibration.quantizers(8.0).items():
        assert (q.bits == 8).all()
        x = tiny_kv[key]
        assert _centred_rel_err(x, q.fake_quantize(x, _positions(q, x)), _centre(q, x)) < 2e-3, key


def test_error_decreases_with_budget_on_real_data(tiny_llama_calibration: Any, tiny_kv: dict) -> None:
    """Held-out tiny-Llama keys/values: more bits, less error, for every layer and K/V."""
    budgets = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
    errs: dict[tuple[int, str], list[float]] = {}
    for b in budgets:
        for key, q in tiny_llama_calibration.quantizers(b).items():
            x = tiny_kv[key]
            errs.setdefault(key, []).append(_centred_rel_err(x, q.fake_quantize(x, _positions(q, x)), _centre(q, x)))
    for key, e in errs.items():  # a block can stay at 0 bits over the lowest budgets: non-increasing
        assert all(lo <= hi for lo, hi in zip(e[1:], e, strict=False)), (key, e)
        assert e[-1] < 0.01 * e[0], (key, e)
    total = [sum(e[i] for e in errs.values()) for i in range(len(budgets))]
    assert all(lo < hi for lo, hi in zip(total[1:], total, strict=False)), total


def test_token_scale_path() -> None:
    """Scales are fp16 RMS of the standardised coordinates; decoding multiplies them back."""
    bits = torch.full((2, 16), 4, dtype=torch.uint8)
    q, x = _quantizer(bits, token_scale=True)
    x = x.clone()
    x[0, :, 3] *= 50  # a loud token: the scale must absorb it
    packed, scales = q.encode(x)
    assert scales is not None and scales.dtype == torch.float16 and scales.shape == (2, 7, 2)
    z = q.rotate(x)
    expected = z.pow(2).mean(-1).sqrt().to(torch.float16).transpose(1, 2)
    assert torch.equal(scales, expected)
    assert float(scales[0, 3].float().min()) > 20 * float(scales[0, 2].float().max())
    assert q.bits_per_token == 2 * 16 * 4 + 2 * 16
    # per-token relative error stays 4-bit-like for the loud token too
    y = q.decode(packed, scales, torch.float32)
    for t in range(7):
        assert _centred_rel_err(x[:, :, t : t + 1], y[:, :, t : t + 1], q.mean) < 0.05, t
    # a token exactly at the mean has z = 0: the floor avoids dividing by zero and it decodes to the mean
    x0 = q.mean[None, :, None].expand(1, 2, 1, 16).clone()
    p0, s0 = q.encode(x0)
    assert torch.isfinite(s0.float()).all() and float(s0.float().max()) <= 2 * SCALE_FLOOR
    torch.testing.assert_close(q.decode(p0, s0, torch.float32), x0, rtol=0, atol=1e-4)


def test_regimes_are_contiguous_widest_first() -> None:
    bits = torch.tensor([[0] * 8 + [5] * 8 + [2] * 16, [8] * 8 + [0] * 24], dtype=torch.uint8)
    q, _ = _quantizer(bits, token_scale=False)
    assert [(r.bits, r.start, r.count, r.byte_offset) for r in q.regimes[0]] == [(5, 0, 8, 0), (2, 8, 16, 5)]
    assert [(r.bits, r.start, r.count, r.byte_offset) for r in q.regimes[1]] == [(8, 0, 8, 0)]
    assert q.head_byte_offsets == [0, 9] and q.row_bytes == 17


@pytest.mark.parametrize("token_scale", [False, True])
def test_fake_quantize_equals_encode_then_decode(tiny_llama_calibration: Any, tiny_kv: dict, token_scale: bool) -> None:
    """Calibration scores allocations with fake_quantize (no packing); it must be exactly what the cache returns."""
    cfg = tiny_llama_calibration
    l = cfg.compressed_layers[0]
    q = SpectralQuantizer(cfg.tensor(l, "k", "mean"), cfg.tensor(l, "k", "basis"), cfg.tensor(l, "k", "eigenvalues"),
                          cfg.tensor(l, "k", "codebooks"), cfg.allocation()[(l, "k")], token_scale)
    x = tiny_kv[(l, "k")]
    packed, scales = q.encode(x)
    assert torch.equal(q.fake_quantize(x), q.decode(packed, scales, x.dtype))


@pytest.mark.parametrize("token_scale", [False, True])
def test_vectorised_codes_equal_packing_each_regime(token_scale: bool) -> None:
    """The encoder (one searchsorted + byte scatter for all heads and regimes) writes exactly the rows that
    quantizing and packing each regime separately writes, and the decoder reads them back the same way."""
    from spectralkv.packing import pack, unpack

    g = torch.Generator().manual_seed(3)
    widths = torch.tensor([8, 7, 6, 5, 4, 3, 2, 1, 0, 2, 3, 2], dtype=torch.uint8)  # groups of 8 coordinates
    bits = torch.stack([widths[torch.randperm(12, generator=g)].repeat_interleave(8) for _ in range(3)])
    bits = torch.stack([row[torch.randperm(96, generator=g)] for row in bits])  # different order per head
    q, x = _quantizer(bits, token_scale, seed=5)
    packed, scales = q.encode(x)
    z = q.rotate(x)
    if token_scale:
        z = z / scales.transpose(1, 2).float().unsqueeze(-1)
    want = torch.zeros_like(packed)
    expected_z = torch.zeros_like(z)
    for h in range(q.num_heads):
        for r in q.regimes[h]:
            sl = slice(r.start, r.start + r.count)
            codes = cb.quantize(z[:, h, :, sl], q.codebooks, r.bits)
            o = q.head_byte_offsets[h] + r.byte_offset
            want[:, :, o : o + r.nbytes] = pack(codes, r.bits)
            back = unpack(packed[:, :, o : o + r.nbytes], r.bits, r.count)
            expected_z[:, h, :, sl] = cb.dequantize(back, q.codebooks, r.bits, torch.float32)
    assert [len(r) for r in q.regimes] == [8, 8, 8] and q.row_bytes == 3 * int(widths.long().sum())
    assert torch.equal(packed, want)
    got = q.decode_rotated(packed, scales)
    if token_scale:
        expected_z = expected_z * scales.transpose(1, 2).float().unsqueeze(-1)
    torch.testing.assert_close(got, expected_z, rtol=0, atol=0)
    torch.testing.assert_close(q.fake_quantize(x), q.decode(packed, scales, torch.float32), rtol=1e-6, atol=1e-5)
