"""Baseline stores (KIVI-style, TurboQuant-style, transformers' QuantizedCache) and the method factory."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import make_tiny, tiny_calibrate

from spectralkv.baselines import (
    KiviStore,
    TurboQuantStore,
    compressed_cache,
    gaussian_lloyd_max,
    hf_quantized_bits_per_coordinate,
    hf_quantized_cache,
    kivi_cache,
    random_rotation,
    turboquant_cache,
)
from spectralkv.baselines.turboquant import split_bits
from spectralkv.evaluation.methods import (
    DecodeCachedStore,
    MethodUnavailable,
    bits_per_coordinate,
    make_cache,
    plan_runs,
)
from spectralkv.evaluation.replay import capture_prefill, replay_prefill
from spectralkv.layer_base import CompressedLayer, TokenStore

H, D = 3, 64

# (id, store factory, hand-computed bits per token for H heads of D coordinates)
STORES: list[tuple[str, Callable[[], TokenStore], float]] = [
    ("kivi-k2", lambda: KiviStore(2, H, D, per_channel=True), H * D * 2 + H * D * 32 / 32),
    ("kivi-v2", lambda: KiviStore(2, H, D, per_channel=False), H * D * 2 + H * (D // 32) * 32),
    ("kivi-k3", lambda: KiviStore(3, H, D, per_channel=True), H * D * 3 + H * D),
    ("kivi-v4", lambda: KiviStore(4, H, D, per_channel=False), H * D * 4 + H * 2 * 32),
    ("kivi-k8-g16", lambda: KiviStore(8, H, D, per_channel=True, group_size=16), H * D * 8 + H * D * 32 / 16),
    ("tq2", lambda: TurboQuantStore(2, H, D), H * (D * 2 + 16)),
    ("tq2.5", lambda: TurboQuantStore(2.5, H, D), H * (32 * 3 + 32 * 2 + 16)),
    ("tq3", lambda: TurboQuantStore(3, H, D), H * (D * 3 + 16)),
    ("tq4", lambda: TurboQuantStore(4, H, D, seed=7), H * (D * 4 + 16)),
]
IDS = [s[0] for s in STORES]


def _data(b: int = 2, n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, H, n, D, generator=g) * 2 + torch.linspace(-3, 3, D)  # channel offsets like real keys


@pytest.mark.parametrize(("name", "factory", "bits"), STORES, ids=IDS)
def test_bits_accounting_matches_hand_computation(name: str, factory: Callable[[], TokenStore], bits: float) -> None:
    store = factory()
    assert store.bits_per_token() == pytest.approx(bits)
    store.append(_data(n=128))
    assert store.bits_per_token() == pytest.approx(bits)


def test_bits_per_coordinate_examples() -> None:
    """The README's figures: KIVI with G=32 costs code bits + 1, TurboQuant code bits + 16/64."""
    per_coord = {name: factory().bits_per_token() / (H * D) for name, factory, _ in STORES}
    assert per_coord["kivi-k2"] == per_coord["kivi-v2"] == 3.0
    assert per_coord["tq2.5"] == 2.75 and per_coord["tq4"] == 4.25


@pytest.mark.parametrize(("name", "factory", "bits"), STORES, ids=IDS)
def test_round_trip_shapes_and_tail(name: str, factory: Callable[[], TokenStore], bits: float) -> None:
    store = factory()
    assert store.decode(torch.float32) is None and len(store) == 0
    m = store.flush_multiple
    chunks = [_data(n=m * k, seed=k) for k in (1, 3, 2)]
    for c in chunks:
        store.append(c)
    full = store.decode(torch.float32)
    x = torch.cat(chunks, 2)
    assert full.shape == x.shape and full.dtype == torch.float32 and len(store) == x.shape[2]
    assert store.decode(torch.float16).dtype == torch.float16
    rel = float((full - x).pow(2).mean() / x.pow(2).mean())
    assert rel < 0.2, f"{name}: relative MSE {rel:.3f}"
    tail = store.decode_tail(m * 2, torch.float32)  # type: ignore[attr-defined]
    torch.testing.assert_close(tail, full[:, :, -m * 2 :])
    # chunks are coded independently: a fresh store holding only the last chunk decodes it identically
    alone = factory()
    alone.append(chunks[-1])
    torch.testing.assert_close(alone.decode(torch.float32), full[:, :, -chunks[-1].shape[2] :])


@pytest.mark.parametrize(("name", "factory", "bits"), STORES, ids=IDS)
def test_select_batch_reorders_codes_exactly(name: str, factory: Callable[[], TokenStore], bits: float) -> None:
    store = factory()
    store.append(_data(b=3, n=store.flush_multiple * 2))
    before = store.decode(torch.float32)
    index = torch.tensor([2, 0, 0, 1])
    store.select_batch(index)
    assert torch.equal(store.decode(torch.float32), before[index])


@pytest.mark.parametrize(("name", "factory", "bits"), STORES, ids=IDS)
def test_resident_memory_equals_accounting(name: str, factory: Callable[[], TokenStore], bits: float) -> None:
    """Codes are packed: at a full growth chunk (128 tokens) resident bytes are exactly the accounted bits."""
    store = factory()
    store.append(_data(b=2, n=128))
    mem = store.memory()
    if isinstance(store, KiviStore):
        code_bits = H * D * store.bits
    else:
        assert isinstance(store, TurboQuantStore)
        code_bits = H * (store.hi_count * store.hi_bits + store.lo_count * store.lo_bits)
    assert mem["codes"] == 2 * 128 * code_bits / 8
    assert mem["codes"] + mem["metadata"] == 2 * 128 * bits / 8


def test_kivi_error_within_half_a_step() -> None:
    x = _data(n=64)
    for per_channel in (True, False):
        store = KiviStore(3, H, D, per_channel=per_channel)
        store.append(x)
        err = (store.decode(torch.float32) - x).abs()
        if per_channel:
            span = x.view(2, H, 2, 32, D).amax(3) - x.view(2, H, 2, 32, D).amin(3)  # per channel per group
            step = (span / 7).repeat_interleave(32, 2)
        else:
            span = x.view(2, H, 64, 2, 32).amax(-1) - x.view(2, H, 64, 2, 32).amin(-1)
            step = (span / 7).repeat_interleave(32, -1)
        assert bool((err <= step / 2 + 1e-2).all())  # + fp16 rounding of scale and zero


def test_kivi_8_bits_nearly_lossless_and_constant_tokens() -> None:
    x = _data(n=32)
    store = KiviStore(8, H, D, per_channel=True)
    store.append(x)
    assert float((store.decode(torch.float32) - x).pow(2).mean() / x.pow(2).mean()) < 1e-4
    const = torch.full((1, H, 32, D), 1.5)
    store = KiviStore(2, H, D, per_channel=True)
    store.append(const)
    torch.testing.assert_close(store.decode(torch.float32), const)


def test_invalid_parameters_name_the_field() -> None:
    with pytest.raises(ValueError, match="bits"):
        KiviStore(2.5, H, D, per_channel=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group_size"):
        KiviStore(2, H, 48, per_channel=False)
    with pytest.raises(ValueError, match="bits"):
        TurboQuantStore(0.5, H, D)
    with pytest.raises(ValueError, match="multiples"):
        KiviStore(2, H, D, per_channel=True).append(_data(n=5))


def test_gaussian_lloyd_max_known_values() -> None:
    one_bit = torch.tensor([-1, 1], dtype=torch.float64) * math.sqrt(2 / math.pi)
    torch.testing.assert_close(gaussian_lloyd_max(1), one_bit)
    torch.testing.assert_close(gaussian_lloyd_max(2), torch.tensor([-1.5104, -0.4528, 0.4528, 1.5104],
                                                                   dtype=torch.float64), atol=1e-4, rtol=0)
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = gaussian_lloyd_max(2)
    zq = c[torch.bucketize(z, (c[1:] + c[:-1]) / 2)]
    assert float((z - zq).pow(2).mean()) == pytest.approx(0.1175, abs=2e-3)  # Max (1960)


def test_rotation_is_orthogonal_and_seeded() -> None:
    r = random_rotation(64, 3)
    torch.testing.assert_close(r @ r.T, torch.eye(64), atol=1e-5, rtol=0)
    assert torch.equal(r, random_rotation(64, 3)) and not torch.equal(r, random_rotation(64, 4))
    assert split_bits(2.5, 64) == (3, 32, 2) and split_bits(3, 64) == (3, 0, 3) and split_bits(2.25, 64) == (3, 16, 2)


# -- whole caches on a tiny model -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny64() -> torch.nn.Module:
    return make_tiny("llama", head_dim=64)


@pytest.fixture(scope="module")
def tiny64_calibration(tiny64: torch.nn.Module) -> Any:
    return tiny_calibrate(tiny64)


CACHE_METHODS = [("kivi", 3), ("kivi", 8), ("turboquant", 2.5), ("spectralkv", 3.0), ("hf-quantized", 8)]


def _decode_logits(model: torch.nn.Module, cache: Any, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    with torch.inference_mode():
        model(input_ids=ids[:, :prefill], cache=cache, use_cache=True)
        out = [model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1]
               for t in range(prefill, ids.shape[1])]
    return torch.stack(out, 1)


def _ids(b: int = 2, n: int = 56) -> torch.Tensor:
    return torch.randint(0, 256, (b, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("method", "bits"), CACHE_METHODS[:-1])
def test_decode_cache_gives_the_same_logits(tiny64: torch.nn.Module, tiny64_calibration: Any, method: str,
                                            bits: float) -> None:
    ids = _ids()
    kw = dict(calibration=tiny64_calibration, window=8, sink_tokens=4)
    plain = _decode_logits(tiny64, make_cache(method, tiny64, bits, **kw), ids, 44)
    fast_cache = make_cache(method, tiny64, bits, decode_cache=True, **kw)
    fast = _decode_logits(tiny64, fast_cache, ids, 44)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    assert any(isinstance(layer.key_store, DecodeCachedStore) for layer in fast_cache.layers)
    exact = _decode_logits(tiny64, make_cache("fp16", tiny64), ids, 44)
    assert not torch.equal(plain, exact), "compression must change something"


@pytest.mark.parametrize(("method", "bits"), CACHE_METHODS)
def test_reorder_cache_matches_reordered_inputs(tiny64: torch.nn.Module, tiny64_calibration: Any, method: str,
                                                bits: float) -> None:
    ids = _ids(b=3)
    kw = dict(calibration=tiny64_calibration, window=8, sink_tokens=4)
    index = torch.tensor([2, 0, 1])
    cache = make_cache(method, tiny64, bits, **kw)
    with torch.inference_mode():
        tiny64(input_ids=ids[:, :44], cache=cache, use_cache=True)
        cache.reorder_cache(index)
        got = tiny64(input_ids=ids[index, 44:45], cache=cache, use_cache=True).logits
    ref_cache = make_cache(method, tiny64, bits, **kw)
    with torch.inference_mode():
        tiny64(input_ids=ids[index, :44], cache=ref_cache, use_cache=True)
        want = tiny64(input_ids=ids[index, 44:45], cache=ref_cache, use_cache=True).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("method", "bits"), [*CACHE_METHODS, ("fp16", None)])
def test_replayed_prefill_equals_real_prefill(tiny64: torch.nn.Module, tiny64_calibration: Any, method: str,
                                              bits: float | None) -> None:
    ids = _ids()

    def factory() -> Any:
        return make_cache(method, tiny64, bits, calibration=tiny64_calibration, window=8, sink_tokens=4)

    captured = capture_prefill(tiny64, ids[:, :44])
    cache, replayed = replay_prefill(tiny64, factory, captured)
    assert replayed
    with torch.inference_mode():
        got = torch.stack([tiny64(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1]
                           for t in range(44, 56)], 1)
    torch.testing.assert_close(got, _decode_logits(tiny64, factory(), ids, 44), atol=1e-5, rtol=1e-5)


def test_cache_bits_per_coordinate(tiny64: torch.nn.Module, tiny64_calibration: Any) -> None:
    ids = _ids()
    expected = {("kivi", 2): 3.0, ("kivi", 4): 5.0, ("turboquant", 2.5): 2.75, ("turboquant", 3): 3.25,
                ("spectralkv", 3.0): tiny64_calibration.effective_bits(3.0)}
    for (method, bits), want in expected.items():
        cache = make_cache(method, tiny64, bits, calibration=tiny64_calibration, window=8, sink_tokens=4)
        _decode_logits(tiny64, cache, ids[:, :46], 44)
        assert bits_per_coordinate(cache, tiny64) == pytest.approx(want), method
    cache = hf_quantized_cache(tiny64, "fp8", 8)
    _decode_logits(tiny64, cache, ids[:, :46], 44)
    n, heads, d = 46, 2, 64  # 8-bit codes + one fp32 scale per layer and K/V
    assert hf_quantized_bits_per_coordinate(cache, tiny64) == pytest.approx(8 + 32 / (n * heads * d))
    assert bits_per_coordinate(make_cache("fp16", tiny64), tiny64) is None


def test_caches_use_shared_sinks_and_window(tiny64: torch.nn.Module) -> None:
    for cache in (kivi_cache(tiny64, 2, sink_tokens=4, window=16), turboquant_cache(tiny64, 3, sink_tokens=4,
                                                                                     window=16)):
        _decode_logits(tiny64, cache, _ids(n=60), 54)
        layer = cache.layers[0]
        assert isinstance(layer, CompressedLayer) and layer.sink_keys.shape[2] == 4
        assert 16 <= layer.keys.shape[2] < 16 + layer.key_store.flush_multiple
        assert layer.get_seq_length() == 60 and len(layer.key_store) == 60 - 4 - layer.keys.shape[2] > 0


def test_make_cache_errors_and_plan(tiny64: torch.nn.Module, tiny64_calibration: Any) -> None:
    with pytest.raises(ValueError, match="Unknown method"):
        make_cache("nope", tiny64, 3)
    with pytest.raises(MethodUnavailable, match="integer"):
        make_cache("kivi", tiny64, 2.5)
    with pytest.raises(MethodUnavailable, match="calibration"):
        make_cache("spectralkv", tiny64, 3)
    runs, skipped = plan_runs(["spectralkv", "kivi", "turboquant", "hf-quantized"], [2, 2.5], tiny64_calibration)
    labels = [r.label for r in runs]
    assert labels[0] == "fp16" and "kivi@2" in labels and "turboquant@2.5" in labels and "hf-fp8@8" in labels
    assert "kivi@2.5" not in labels
    reasons = {(s.method, s.bits): s.reason for s in skipped}
    assert "integer" in reasons[("kivi", 2.5)]
    runs, skipped = plan_runs(["spectralkv"], [3], None)
    assert [r.label for r in runs] == ["fp16"] and "calibration" in skipped[0].reason


def test_compressed_cache_with_custom_store(tiny64: torch.nn.Module) -> None:
    """Any TokenStore plugs into the shared layer (the tests' broken method relies on this)."""

    class Zero(TurboQuantStore):
        def decode(self, dtype: torch.dtype) -> torch.Tensor | None:
            x = super().decode(dtype)
            return None if x is None else torch.zeros_like(x)

    cache = compressed_cache(tiny64, lambda layer, kind: Zero(4, 2, 64), sink_tokens=4, window=8)
    logits = _decode_logits(tiny64, cache, _ids(), 44)
    assert torch.isfinite(logits).all()


def test_plan_runs_hf_budgets(tiny64_calibration: object) -> None:
    """QuantizedCache backends run at their own budgets (default: 4 bits only), fp8 once regardless."""
    from spectralkv.baselines.hf_quantized import backend_unavailable
    from spectralkv.evaluation.runner import DEFAULT_HF_BUDGETS

    def hf_labels(hf: object) -> set[str]:
        runs, _ = plan_runs(["kivi", "hf-quantized"], [2, 3, 4], None, hf)  # type: ignore[arg-type]
        return {r.label for r in runs if r.method == "hf-quantized"}

    assert DEFAULT_HF_BUDGETS == (4.0,)
    only4, every = hf_labels([4]), hf_labels(None)
    assert "hf-fp8@8" in only4 and "hf-fp8@8" in every
    assert hf_labels([]) == {"hf-fp8@8"}
    if backend_unavailable("hqq") is None:
        assert "hf-hqq@4" in only4 and "hf-hqq@2" not in only4 and {"hf-hqq@2", "hf-hqq@3"} <= every
    kivi = [r.label for r in plan_runs(["kivi", "hf-quantized"], [2, 3], None, [4])[0] if r.method == "kivi"]
    assert kivi == ["kivi@2", "kivi@3"]  # the other methods keep `budgets`
