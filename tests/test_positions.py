"""RoPE-aware centring (``position_centring="rope"``): the one-pass moments are exact, the quantizer and the cache
decode what they encoded at each token's position, artifacts carry and validate the extra tensors, caches that
cannot serve it say so, and on keys with a real pre-RoPE mean it lowers the key error, above all beyond the
calibration's sequence length."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny, tiny_calibrate
from test_validate import _edit_json, _refused, _rewrite_tensors

from spectralkv import SpectralKVCache, attached
from spectralkv.cache import SpectralStore
from spectralkv.capture import capture_attention
from spectralkv.config import ROPE_FREQUENCIES, SpectralKVConfig, tensor_name
from spectralkv.layer_base import CompressedLayer
from spectralkv.positions import (
    PositionMoments,
    check_frequencies,
    model_rope_frequencies,
    position_features,
    rotate,
    rotate_half,
    unrotate,
)

D = 16


def _freqs(d: int = D) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    return torch.cat([inv, inv])


def test_rotate_and_unrotate_are_inverse_and_match_transformers() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    from transformers.models.llama.modeling_llama import rotate_half as hf_rotate_half

    x = torch.randn(2, 3, 10, D)
    cos, sin = position_features(torch.arange(10), _freqs())
    assert torch.equal(rotate_half(x), hf_rotate_half(x))
    ref, _ = apply_rotary_pos_emb(x, x, cos[None], sin[None])
    torch.testing.assert_close(rotate(x, cos, sin), ref)
    torch.testing.assert_close(unrotate(rotate(x, cos, sin), cos, sin), x, atol=1e-5, rtol=1e-5)


def test_position_moments_are_the_residual_moments_in_one_pass() -> None:
    """Accumulated chunk by chunk before ``m`` is known, the residual mean and covariance equal those computed
    directly from ``k_p - R_p m`` once ``m`` is; and ``m`` recovers a planted pre-RoPE mean."""
    torch.manual_seed(0)
    h, n = 2, 3000
    freqs = _freqs()
    m_true = torch.randn(h, D) * 3
    pos = torch.arange(4, 4 + n)
    cos, sin = position_features(pos, freqs)
    keys = rotate(m_true[:, None, :], cos, sin) + torch.randn(h, n, D) * torch.linspace(0.2, 1.0, D)
    acc = PositionMoments(h, D, freqs)
    for chunk in torch.arange(n).split(700):
        acc.update(keys[:, chunk], pos[chunk])
    m, mu, cov = acc.residual()
    direct_m = unrotate(keys.double(), cos.double(), sin.double()).mean(1)
    torch.testing.assert_close(m, direct_m, atol=1e-6, rtol=1e-6)
    r = keys.double() - rotate(m[:, None, :], cos.double(), sin.double())
    torch.testing.assert_close(mu, r.mean(1), atol=1e-6, rtol=1e-6)
    rc = r - r.mean(1, keepdim=True)
    torch.testing.assert_close(cov, rc.transpose(1, 2) @ rc / n, atol=1e-6, rtol=1e-6)
    assert (m - m_true).abs().max() < 0.15  # the planted mean, up to sampling noise
    raw = keys.double() - keys.double().mean(1, keepdim=True)
    assert cov.diagonal(dim1=-2, dim2=-1).sum() < 0.5 * (raw.pow(2).sum() / n)  # the rotating mean is gone


def test_check_frequencies_refuses_what_rotate_half_cannot_pair() -> None:
    assert torch.equal(check_frequencies(_freqs(), D), _freqs())
    with pytest.raises(ValueError, match="repeat"):
        check_frequencies(torch.arange(D).float(), D)
    with pytest.raises(ValueError, match="head_dim=16"):
        check_frequencies(_freqs(8), D)
    with pytest.raises(ValueError, match="finite"):
        check_frequencies(torch.full((D,), float("nan")), D)


def test_model_frequencies_are_the_models_own(tiny_llama: torch.nn.Module) -> None:
    inv = tiny_llama.model.rotary_emb.inv_freq.float()
    assert torch.equal(model_rope_frequencies(tiny_llama, D), torch.cat([inv, inv]))
    with pytest.raises(ValueError, match="rotary embedding"):
        model_rope_frequencies(torch.nn.Linear(2, 2), D)


def test_model_frequencies_refuse_an_interleaved_rotation(tiny_llama: torch.nn.Module,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    rot = tiny_llama.model.rotary_emb
    original = type(rot).forward

    def interleaved(self: Any, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = original(self, x, position_ids)
        return cos.flip(-1), sin.flip(-1)

    monkeypatch.setattr(type(rot), "forward", interleaved)
    with pytest.raises(ValueError, match="rotate_half pairs"):
        model_rope_frequencies(tiny_llama, D)


# -- calibrations with a real pre-RoPE mean ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def biased_llama() -> torch.nn.Module:
    """A tiny Llama whose keys carry a large pre-RoPE mean (a k_proj bias), as trained models' keys do."""
    model = make_tiny("llama", seed=1, attention_bias=True)
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias.copy_(torch.randn_like(layer.self_attn.k_proj.bias) * 2)
    return model


@pytest.fixture(scope="module")
def rope_calibration(biased_llama: torch.nn.Module) -> SpectralKVConfig:
    return tiny_calibrate(biased_llama, position_centring="rope", profile_budgets=())


@pytest.fixture(scope="module")
def plain_calibration(biased_llama: torch.nn.Module) -> SpectralKVConfig:
    return tiny_calibrate(biased_llama, profile_budgets=(), position_centring=None)


def _keys(model: torch.nn.Module, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}

    def cb(layer: int, module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        out[layer] = k.detach().float().clone()

    with torch.no_grad(), capture_attention(model, cb):
        model(ids)
    return out


def test_rope_centring_lowers_key_error_above_all_beyond_the_calibration_length(
        biased_llama: torch.nn.Module, rope_calibration: SpectralKVConfig,
        plain_calibration: SpectralKVConfig) -> None:
    """Calibrated on 128-token sequences, served at positions 4-128 and 384-512: the per-position centre beats the
    post-RoPE mean in both, by more beyond the calibration's length."""
    torch.manual_seed(3)
    keys = _keys(biased_llama, torch.randint(0, 256, (2, 512)))
    pos = torch.arange(512)
    errs = {}
    for name, cfg in (("rope", rope_calibration), ("plain", plain_calibration)):
        q = cfg.quantizers(2.0)
        for where, sl in (("in", slice(4, 128)), ("beyond", slice(384, 512))):
            num = den = 0.0
            for layer, k in keys.items():
                kh = q[(layer, "k")].fake_quantize(k[:, :, sl], positions=pos[sl])
                num += float((kh - k[:, :, sl]).pow(2).sum())
                den += float(k[:, :, sl].pow(2).sum())
            errs[(name, where)] = (num / den) ** 0.5
    assert errs[("rope", "in")] < errs[("plain", "in")]
    assert errs[("rope", "beyond")] < 0.8 * errs[("plain", "beyond")], errs
    measured = rope_calibration.measured["layers"][0]
    assert measured["k_centre_energy"] > measured["k_mean_energy"]


def test_only_keys_are_position_centred(rope_calibration: SpectralKVConfig) -> None:
    q = rope_calibration.quantizers()
    for layer in rope_calibration.compressed_layers:
        assert q[(layer, "k")].position_centred and not q[(layer, "v")].position_centred
    assert rope_calibration.calibration["position_centring"] == "rope"


def test_encode_decode_at_positions_equals_fake_quantize(rope_calibration: SpectralKVConfig) -> None:
    q = rope_calibration.quantizers()[(rope_calibration.compressed_layers[0], "k")]
    x = torch.randn(2, 2, 9, D) * 2
    positions = torch.tensor([[100 + i for i in range(9)], [7 + i for i in range(9)]])
    packed, scales, outliers = q.encode_with_outliers(x, positions=positions)
    dec = q.decode(packed, scales, torch.float32, outliers, positions=positions)
    torch.testing.assert_close(dec, q.fake_quantize(x, positions=positions), atol=1e-4, rtol=1e-4)
    other = q.decode(packed, scales, torch.float32, outliers, positions=positions + 50)
    assert (other - dec).abs().max() > 0.1  # the centre really depends on the position
    with pytest.raises(ValueError, match="pass the tokens' positions"):
        q.fake_quantize(x)
    with pytest.raises(ValueError, match="positions must be"):
        q.fake_quantize(x, positions=torch.arange(5))


def test_store_keeps_first_positions_and_refuses_gaps(rope_calibration: SpectralKVConfig) -> None:
    q = rope_calibration.quantizers()[(rope_calibration.compressed_layers[0], "k")]
    store = SpectralStore(q)
    assert store.needs_positions
    x = torch.randn(2, 2, 6, D)
    first = torch.tensor([[10], [3]])
    store.append(x[:, :, :4], positions=first + torch.arange(4))
    store.append(x[:, :, 4:], positions=first + torch.arange(4, 6))
    whole = q.fake_quantize(x, positions=first + torch.arange(6))
    torch.testing.assert_close(store.decode(torch.float32), whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(store.decode_tail(2, torch.float32), whole[:, :, 4:], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="consecutive"):
        store.append(x[:, :, :1], positions=first + 9)
    with pytest.raises(ValueError, match="positions="):
        store.append(x[:, :, :1])
    store.select_batch(torch.tensor([1, 1, 0]))
    torch.testing.assert_close(store.decode(torch.float32), whole[[1, 1, 0]], atol=1e-4, rtol=1e-4)


def test_store_shares_positions_given_as_one_row(rope_calibration: SpectralKVConfig) -> None:
    """Positions given once for every row (``[1, n]``, a cache layer without left padding) decode like the same
    positions given per row, with one centre per position; a later per-row append must still follow them."""
    q = rope_calibration.quantizers()[(rope_calibration.compressed_layers[0], "k")]
    x = torch.randn(3, 2, 7, D)
    shared, per_row = SpectralStore(q), SpectralStore(q)
    shared.append(x[:, :, :5], positions=torch.arange(40, 45)[None])
    per_row.append(x[:, :, :5], positions=torch.arange(40, 45).expand(3, 5))
    assert shared.rows_share_positions and not per_row.rows_share_positions
    assert shared._positions(0, 5).shape == (1, 5)
    shared.append(x[:, :, 5:], positions=torch.arange(45, 47).expand(3, 2))
    per_row.append(x[:, :, 5:], positions=torch.arange(45, 47).expand(3, 2))
    assert torch.equal(shared.decode(torch.float32), per_row.decode(torch.float32))
    with pytest.raises(ValueError, match="consecutive"):
        shared.append(x[:, :, :1], positions=torch.tensor([[47], [47], [50]]))
    shared.select_batch(torch.tensor([2, 0]))
    assert torch.equal(shared.decode(torch.float32), per_row.decode(torch.float32)[[2, 0]])


def test_left_padded_rows_are_centred_at_their_own_positions(biased_llama: torch.nn.Module,
                                                             rope_calibration: SpectralKVConfig) -> None:
    """``generate`` gives a left-padded row positions from its first real token; the cache centres it there, so its
    compressed keys decode as when the row is generated alone."""
    torch.manual_seed(4)
    long, short = torch.randint(2, 256, (1, 40)), torch.randint(2, 256, (1, 33))
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1)])
    mask = (torch.arange(40) >= torch.tensor([[0], [pad]])).long()
    with attached(biased_llama, rope_calibration, window=8):
        out = biased_llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                    return_dict_in_generate=True, pad_token_id=0)
        alone = biased_llama.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=6,
                                      do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    layer = rope_calibration.compressed_layers[0]
    batch_layer, alone_layer = out.cache.layers[layer], alone.cache.layers[layer]
    assert isinstance(batch_layer, CompressedLayer)
    sinks = rope_calibration.sink_tokens
    assert batch_layer.key_store.first_position.flatten().tolist() == [sinks + pad, sinks]
    assert alone_layer.key_store.first_position.flatten().tolist() == [sinks]
    a = alone_layer.key_store.decode(torch.float32)[0]  # store token j: position sinks + j in both
    b = batch_layer.key_store.decode(torch.float32)[1]
    n = min(a.shape[1], b.shape[1])
    assert n > 20
    torch.testing.assert_close(b[:, :n], a[:, :n], atol=1e-3, rtol=1e-3)
    assert out.sequences[1, 40:].tolist() == alone.sequences[0, 33:].tolist()


def test_cache_generates_with_beams(biased_llama: torch.nn.Module, rope_calibration: SpectralKVConfig) -> None:
    ids = torch.randint(2, 256, (1, 30))
    cache = SpectralKVCache(biased_llama, rope_calibration, window=4)
    out = biased_llama.generate(ids, max_new_tokens=6, num_beams=2, do_sample=False, cache=cache,
                                pad_token_id=0)
    assert out.shape == (1, 36)
    assert cache.memory_report()["compressed_tokens"] > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_static_cache_serves_position_centring(biased_llama: torch.nn.Module, rope_calibration: SpectralKVConfig,
                                               backend: str) -> None:
    """The static cache's code row r is position sinks + r: its decode steps give the dynamic cache's logits."""
    from spectralkv.fused import enable_fused
    from spectralkv.static import StaticSpectralKVCache

    model = copy.deepcopy(biased_llama)
    enable_fused(model)
    torch.manual_seed(6)
    ids = torch.randint(2, 256, (2, 24))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    dynamic = biased_llama.generate(ids, cache=SpectralKVCache(biased_llama, rope_calibration, window=4),
                                    **kw)
    static = model.generate(ids, cache=StaticSpectralKVCache(model, rope_calibration, max_cache_len=29,
                                                                       window=4, backend=backend), **kw)
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    for a, b in zip(static.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_cache_serves_position_centring(biased_llama: torch.nn.Module, rope_calibration: SpectralKVConfig,
                                              backend: str) -> None:
    """Fused decode steps (reference or Triton kernel, which add ``q . R_p m`` per token) give the logits the
    dynamic cache gives, and the greedy tokens."""
    from spectralkv.fused import FusedSpectralKVCache, enable_fused

    model = copy.deepcopy(biased_llama)
    enable_fused(model)
    torch.manual_seed(5)
    ids = torch.randint(2, 256, (2, 24))
    runs = {}
    for name, cache in (("dynamic", SpectralKVCache(biased_llama, rope_calibration, window=4)),
                        ("fused", FusedSpectralKVCache(model, rope_calibration, window=4, backend=backend))):
        runner = model if name == "fused" else biased_llama
        runs[name] = runner.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                     cache=cache, output_logits=True, return_dict_in_generate=True,
                                     pad_token_id=0)
        assert cache.layers[rope_calibration.compressed_layers[0]].key_store.first_position is not None
    assert runs["fused"].sequences.tolist() == runs["dynamic"].sequences.tolist()
    for a, b in zip(runs["fused"].logits, runs["dynamic"].logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# -- artifacts ----------------------------------------------------------------------------------------------------
@pytest.fixture
def rope_folder(rope_calibration: SpectralKVConfig, tmp_path: Path) -> Path:
    rope_calibration.save_pretrained(tmp_path / "rope")
    return tmp_path / "rope"


def test_round_trip_keeps_the_position_terms(rope_folder: Path, rope_calibration: SpectralKVConfig,
                                             biased_llama: torch.nn.Module) -> None:
    cfg = SpectralKVConfig.from_pretrained(rope_folder, model=biased_llama)
    assert cfg.position_centring == "rope"
    for name in (ROPE_FREQUENCIES, tensor_name(cfg.compressed_layers[0], "k", "position_mean")):
        assert torch.equal(cfg.tensors[name], rope_calibration.tensors[name])
    assert tensor_name(cfg.compressed_layers[0], "v", "position_mean") not in cfg.tensors


def test_missing_position_tensor_is_refused(rope_folder: Path) -> None:
    name = tensor_name(0, "k", "position_mean")
    _rewrite_tensors(rope_folder, lambda t: t.pop(name))
    err = _refused(rope_folder, "lacks tensors")
    assert name in str(err)


def test_bad_frequencies_are_refused(rope_folder: Path) -> None:
    def scramble(t: dict[str, torch.Tensor]) -> None:
        t[ROPE_FREQUENCIES] = torch.arange(D).float()

    _rewrite_tensors(rope_folder, scramble)
    _refused(rope_folder, "must repeat")


def test_unknown_centring_is_refused(rope_folder: Path) -> None:
    _edit_json(rope_folder, lambda d: d.update(position_centring="alibi"))
    _refused(rope_folder, "position_centring must be one of")


def test_plain_calibration_with_position_tensors_is_refused(rope_folder: Path) -> None:
    """Tensors a config does not declare mean the two files do not belong together."""
    _edit_json(rope_folder, lambda d: d.update(position_centring=None))
    _refused(rope_folder, "unexpected tensors")


def test_calibrate_refuses_an_unknown_centring(tiny_llama: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="position_centring"):
        tiny_calibrate(tiny_llama, position_centring="alibi")


def test_auto_is_rope_where_the_rotary_embedding_allows_it(tiny_llama: torch.nn.Module) -> None:
    from spectralkv.positions import resolve_position_centring

    assert resolve_position_centring(tiny_llama, "auto", D)[0] == "rope"
    assert resolve_position_centring(tiny_llama, None, D) == (None, None)
    # Not monkeypatch.setattr: since pytest 9.2 its undo deletes attributes that were not in the instance __dict__,
    # and a submodule lives in ``_modules``, so the shared fixture would lose its rotary embedding for later tests.
    rotary = tiny_llama.model.rotary_emb
    tiny_llama.model.rotary_emb = torch.nn.Identity()  # no inv_freq to read
    try:
        assert resolve_position_centring(tiny_llama, "auto", D) == (None, None)
        with pytest.raises(ValueError, match="rotary embedding"):
            resolve_position_centring(tiny_llama, "rope", D)
    finally:
        tiny_llama.model.rotary_emb = rotary
    assert tiny_llama.model.rotary_emb is rotary


