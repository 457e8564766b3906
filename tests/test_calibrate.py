"""Calibration on tiny random models of each family: complete and well-formed tensors, sliding layers left alone,
the searched K/V split recorded, the model left as it was, and clear errors for inputs it cannot serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ByteTokenizer, make_tiny, tiny_calibrate

from spectralkv.allocation import GROUP_SIZE
from spectralkv.calibrate import attention_output_delta, calibrate, exact_attention_output
from spectralkv.codebook import MAX_BITS
from spectralkv.config import KINDS, SpectralKVConfig, tensor_name
from spectralkv.fingerprint import UnsupportedArchitectureError
from spectralkv.moments import participation_ratio
from spectralkv.served_attention import serving_mask
from spectralkv.validate import expected_shapes

ERROR_KEY = "heldout_error"  # the quantity the K/V split search minimises, per row of measured["kv_split_search"]


@pytest.fixture(scope="module")
def tiny_qwen2_calibration() -> SpectralKVConfig:
    return tiny_calibrate(make_tiny("qwen2"), bits=2.5)


@pytest.fixture(params=["llama", "qwen2", "gemma2"])
def calibration(request: pytest.FixtureRequest) -> SpectralKVConfig:
    name = {"llama": "tiny_llama_calibration", "qwen2": "tiny_qwen2_calibration", "gemma2": "tiny_gemma2_calibration"}
    return request.getfixturevalue(name[request.param])


def test_tensors_complete_with_expected_shapes(calibration: SpectralKVConfig) -> None:
    expected = expected_shapes(calibration.to_json_dict())
    assert set(calibration.tensors) == set(expected)
    dtypes = {"F32": torch.float32, "U8": torch.uint8}
    for name, (shape, dtype) in expected.items():
        t = calibration.tensors[name]
        assert tuple(t.shape) == shape and t.dtype == dtypes[dtype], name
        assert torch.isfinite(t.float()).all(), name


def test_tensors_are_well_formed(calibration: SpectralKVConfig) -> None:
    h, d = calibration.num_kv_heads, calibration.head_dim
    eye = torch.eye(d).expand(h, d, d)
    for layer in calibration.compressed_layers:
        for kind in KINDS:
            basis = calibration.tensor(layer, kind, "basis")
            torch.testing.assert_close(basis.transpose(1, 2) @ basis, eye, atol=1e-4, rtol=0)
            lam = calibration.tensor(layer, kind, "eigenvalues")
            assert (lam >= 0).all() and (lam[:, 1:] <= lam[:, :-1]).all()
            assert (calibration.tensor(layer, kind, "weights") >= 0).all()
            dist = calibration.tensor(layer, kind, "distortion")
            assert (dist >= 0).all()
            # measured on held-out data: 8 bits beat no bits on every coordinate
            assert (dist[..., MAX_BITS] < dist[..., 0]).all()
            table = calibration.tensor(layer, kind, "codebooks")
            for b in range(1, MAX_BITS + 1):
                c = table[b - 1, : 2**b]
                assert (c[1:] >= c[:-1]).all()
            bits = calibration.tensor(layer, kind, "bits")
            for b in range(1, MAX_BITS + 1):
                assert not ((bits == b).sum(-1) % GROUP_SIZE).any()
    spent = sum(int(t.long().sum()) for t in calibration.allocation().values())
    assert spent == calibration.code_bits_for(calibration.default_bits) // GROUP_SIZE * GROUP_SIZE


def test_sliding_layers_not_compressed(tiny_gemma2: torch.nn.Module, tiny_gemma2_calibration: SpectralKVConfig) -> None:
    types = tiny_gemma2.config.layer_types
    assert types == ["sliding_attention", "full_attention"] * 2
    assert tiny_gemma2_calibration.compressed_layers == [1, 3]
    assert not any(n.startswith(("layers.0.", "layers.2.")) for n in tiny_gemma2_calibration.tensors)
    assert [row["layer"] for row in tiny_gemma2_calibration.measured["layers"]] == [1, 3]
    # the scales and fp16 reference count only the compressed layers
    assert tiny_gemma2_calibration.coords_per_token == 2 * 2 * 2 * 16
    assert tiny_gemma2_calibration.measured["fp16_bytes_per_token"] == 2 * 2 * 2 * 2 * 16


def test_measured_records_search_and_chosen_split(calibration: SpectralKVConfig) -> None:
    m = calibration.measured
    search = m["kv_split_search"]
    assert search, "the K/V split search must be recorded"
    for row in search:
        assert {"token_scale", "key_weight", ERROR_KEY, "key_bits", "value_bits"} <= set(row)
        assert 0 <= row["key_bits"] <= MAX_BITS and 0 <= row["value_bits"] <= MAX_BITS
    chosen = m["chosen"]
    best = min(search, key=lambda r: r[ERROR_KEY])
    assert chosen[ERROR_KEY] == best[ERROR_KEY]
    assert (chosen["token_scale"], chosen["key_weight"]) == (calibration.token_scale, calibration.key_weight)
    assert any(r["token_scale"] == calibration.token_scale and r["key_weight"] == calibration.key_weight
               and r[ERROR_KEY] == chosen[ERROR_KEY] for r in search)
    # the recorded split is the stored allocation's
    split = calibration.kv_split()
    assert chosen["key_bits"] == pytest.approx(split["key_bits"]) and chosen["value_bits"] == pytest.approx(
        split["value_bits"])
    alloc = calibration.allocation()
    for kind, name in (("k", "key_bits"), ("v", "value_bits")):
        direct = sum(float(alloc[(l, kind)].double().mean()) for l in calibration.compressed_layers)
        assert split[name] == pytest.approx(direct / len(calibration.compressed_layers))
    assert m["effective_bits"] == calibration.effective_bits() <= calibration.default_bits
    assert m["bytes_per_token"] == calibration.bytes_per_token()
    # per-layer spectra
    assert [r["layer"] for r in m["layers"]] == calibration.compressed_layers
    for row in m["layers"]:
        for kind in KINDS:
            lam = calibration.tensors[tensor_name(row["layer"], kind, "eigenvalues")]
            assert row[f"{kind}_participation_ratio"] == pytest.approx(float(participation_ratio(lam).mean()), rel=1e-4)
            assert 0.0 <= row[f"{kind}_mean_energy"] <= 1.0
            assert 0.0 < row[f"{kind}_top8_energy"] <= 1.0 + 1e-9


def test_provenance(tiny_qwen2_calibration: SpectralKVConfig) -> None:
    cfg = tiny_qwen2_calibration
    assert cfg.default_bits == cfg.bits == 2.5
    assert cfg.base_model == "tiny-random-qwen2"
    assert cfg.fingerprint["model_type"] == "qwen2"
    c = cfg.calibration
    assert (c["text_source"], c["tokens"], c["heldout_tokens"], c["seq_len"], c["seed"]) == ("pydoc", 1024, 256, 128, 0)
    assert cfg.sink_tokens == c["sink_tokens"] == 4


def test_deterministic_for_a_seed_and_leaves_model_untouched() -> None:
    """Same model, text and seed: bit-identical calibration. The model comes back as it was (attention
    implementation, eval mode, no gradients left behind, weights unchanged)."""
    model = make_tiny("llama", seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    impl = model.config._attn_implementation
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    kw = dict(tokens=512, heldout_tokens=256, seq_len=128, seed=5)
    a = tiny_calibrate(model, bits=3.0, **kw)
    b = tiny_calibrate(model, bits=3.0, **kw)
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name
    assert a.to_json_dict() == b.to_json_dict()
    assert model.config._attn_implementation == impl
    assert not model.training
    for n, p in model.named_parameters():
        assert p.grad is None, n
        assert p.requires_grad == flags[n], n
        assert torch.equal(p.detach(), before[n]), n


@pytest.mark.parametrize("bad", [0, -1.0, 8.5, float("nan"), "lots"])
def test_budget_outside_range(tiny_llama: torch.nn.Module, bad: Any) -> None:
    with pytest.raises(ValueError, match=r"bit budget must be .*\(0, 8\]"):
        tiny_calibrate(tiny_llama, bits=bad)


def test_text_too_short_names_the_numbers(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("x" * 1000, encoding="utf-8")  # 1000 byte tokens; calibration text is the first 45%: 450
    with pytest.raises(ValueError) as info:
        tiny_calibrate(tiny_llama, text=str(text), tokens=1024, heldout_tokens=256)
    msg = str(info.value)
    assert "450 tokens" in msg and "1280" in msg and str(text) in msg


def test_missing_text_file(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither 'pydoc' nor an existing text file"):
        tiny_calibrate(tiny_llama, text=str(tmp_path / "nope.txt"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(seq_len=4, sink_tokens=4), r"`seq_len` \(4\) must exceed `sink_tokens` \(4\)"),
        (dict(tokens=64, seq_len=128), r"`tokens` \(64\) .* must be >= seq_len \(128\)"),
        (dict(heldout_tokens=100, seq_len=128), r"`heldout_tokens` \(100\) must be >= seq_len \(128\)"),
        (dict(window=-1), r"`window` and `sink_tokens` must be >= 0 .* got -1 and"),
    ],
)
def test_bad_lengths(tiny_llama: torch.nn.Module, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_calibrate(tiny_llama, **kwargs)


def test_unsupported_architecture() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2, n_positions=256)).eval()
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'gpt2'") as info:
        calibrate(model, ByteTokenizer(), tokens=256, heldout_tokens=128, seq_len=128, progress=False)
    assert "llama" in str(info.value), "the message lists what is supported"


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("gemma2", dict(layer_types=["sliding_attention", "sliding_attention"])),
        ("mistral", dict(sliding_window=64)),
    ],
)
def test_all_sliding_model_refused(model_type: str, overrides: dict) -> None:
    with pytest.raises(ValueError, match="Every layer of this model is a sliding-window layer"):
        tiny_calibrate(make_tiny(model_type, **overrides))


def test_saved_calibration_reloads_identically(tiny_gemma2_calibration: SpectralKVConfig, tmp_path: Path) -> None:
    """The sliding-layer calibration survives the artifact round trip (layer indices are not renumbered)."""
    tiny_gemma2_calibration.save_pretrained(tmp_path)
    back = SpectralKVConfig.from_pretrained(tmp_path)
    assert back.compressed_layers == [1, 3]
    for l in (1, 3):
        for kind in KINDS:
            assert torch.equal(back.tensor(l, kind, "bits"), tiny_gemma2_calibration.tensors[tensor_name(l, kind,
                                                                                                         "bits")])


def test_heldout_error_sees_the_recent_window_exactly() -> None:
    """With a window, each query sees its last `window` keys/values exact and older ones quantized (as served)."""
    torch.manual_seed(0)
    t, window = 12, 3
    m = serving_mask(t, window)
    assert m.shape == (t, 2 * t) and m[5, :t].nonzero().flatten().tolist() == [0, 1, 2]
    assert m[5, t:].nonzero().flatten().tolist() == [3, 4, 5] and m[1, :t].sum() == 0
    q, k, v = torch.randn(1, 4, t, 8), torch.randn(1, 2, t, 8), torch.randn(1, 2, t, 8)
    kh, vh = k + 0.3 * torch.randn_like(k), v + 0.3 * torch.randn_like(v)
    dy, rel = attention_output_delta(q, k, v, kh, vh, 8**-0.5, None, window)
    dy0, rel0 = attention_output_delta(q, k, v, kh, vh, 8**-0.5, None, 0)
    assert dy[:, :window].abs().max() < 1e-6 and dy0[:, :window].abs().max() > 1e-3  # only exact tokens in view
    assert 0 < rel < rel0
    # the search passes the exact outputs it computed once: the same numbers
    ref_out = exact_attention_output(q, k, v, 8**-0.5, None)
    dy1, rel1 = attention_output_delta(q, k, v, kh, vh, 8**-0.5, None, window, ref_out)
    assert torch.equal(dy1, dy) and rel1 == rel
    # explicit per-query computation for one late query
    i = t - 1
    kk = torch.where((torch.arange(t) > i - window)[None, None, :, None], k, kh).repeat_interleave(2, 1)
    vv = torch.where((torch.arange(t) > i - window)[None, None, :, None], v, vh).repeat_interleave(2, 1)
    p = (q[:, :, i : i + 1] @ kk.transpose(-1, -2) * 8**-0.5).softmax(-1)
    ref = (q[:, :, i : i + 1] @ k.repeat_interleave(2, 1).transpose(-1, -2) * 8**-0.5).softmax(-1)
    want = (p @ vv - ref @ v.repeat_interleave(2, 1))[:, :, 0].reshape(1, -1)
    torch.testing.assert_close(dy[:, i], want, atol=1e-5, rtol=1e-5)
