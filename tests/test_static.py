"""StaticSpectralKVCache: same numbers as the growing fused cache, one compiled graph for every decode step, and clear
errors for what static buffers cannot hold."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import tiny_calibrate

WINDOW, SINKS, PROMPT, NEW = 8, 2, 28, 12


@pytest.fixture()
def fused_llama(tiny_llama: Any) -> Iterator[Any]:
    """The shared tiny Llama with the fused attention selected (restored afterwards)."""
    from spectralkv.fused import enable_fused

    previous = enable_fused(tiny_llama)
    try:
        yield tiny_llama
    finally:
        tiny_llama.set_attn_implementation(previous)


@pytest.fixture(scope="module")
def outlier_calibration(tiny_llama: Any) -> Any:
    """A calibration of the tiny Llama that keeps exact outliers (beyond 2.5 std: a few per token) and per-token scales
    (forced on, as one log8 byte each, served at 2.5 bits so the allocation pays for them), so the static buffers and
    the compiled steps carry both kinds of metadata."""
    import dataclasses

    cfg = tiny_calibrate(tiny_llama, outlier_thresholds=(2.5,))
    cfg = dataclasses.replace(cfg, token_scale=True, bits=2.5)
    assert cfg.outlier_threshold is not None and cfg.outlier_cap is not None and cfg.scale_format == "log8"
    assert all(q.scale_dtype == torch.uint8 for q in cfg.quantizers().values())
    return cfg


def calibration(request: Any, outliers: bool) -> Any:
    """The module's calibration with exact outliers, or the shared one without."""
    if outliers:
        return request.getfixturevalue("outlier_calibration")
    return request.getfixturevalue("tiny_llama_calibration").without_outliers()


def prompt(batch: int = 2, length: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model: Any, cache: Any, ids: torch.Tensor, new: int = NEW, **kwargs: Any) -> Any:
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=new,
                          do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)


def static_cache(model: Any, cfg: Any, **kwargs: Any) -> Any:
    from spectralkv.static import StaticSpectralKVCache

    args = dict(window=WINDOW, sink_tokens=SINKS, backend="torch", max_cache_len=PROMPT + NEW)
    return StaticSpectralKVCache(model, cfg, **{**args, **kwargs})


def assert_same_generation(got: Any, want: Any) -> None:
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits, strict=True)):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.parametrize("outliers", [False, True], ids=lambda o: "outliers" if o else "no-outliers")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("prompt_len", [PROMPT, 5], ids=lambda n: f"prompt={n}")
def test_static_equals_growing_fused_cache(fused_llama: Any, request: Any, backend: str, prompt_len: int,
                                           outliers: bool) -> None:
    """Same tokens compressed the same way as FusedSpectralKVCache(flush_block=1): same greedy tokens and logits, with
    the reference or the Triton kernels (interpreter), from a prompt longer than sinks + window and from one shorter
    (the ring fills during decoding, sinks are written by decode steps), with and without exact outliers (which the
    static cache keeps in fixed slots, the growing one in CSR)."""
    from spectralkv.fused import FusedSpectralKVCache
    from spectralkv.static import StaticCompressedLayer

    cfg = calibration(request, outliers)
    ids = prompt(length=prompt_len)
    want = generate(fused_llama, FusedSpectralKVCache(fused_llama, cfg, window=WINDOW, sink_tokens=SINKS,
                                                      backend=backend), ids)
    cache = static_cache(fused_llama, cfg, backend=backend, max_cache_len=prompt_len + NEW,
                         outlier_slots=cfg.outlier_cap)  # the cap: what the growing cache keeps
    got = generate(fused_llama, cache, ids)
    assert_same_generation(got, want)
    layer = cache.layers[0]
    assert isinstance(layer, StaticCompressedLayer) and layer.triton == (backend == "triton")
    assert int(layer.cumulative_length) == prompt_len + NEW - 1
    # the rows in use hold exactly what the growing cache compressed (which, flushing after the step's attention
    # instead of before the next one, holds one row more)
    ref = FusedSpectralKVCache(fused_llama, cfg, window=WINDOW, sink_tokens=SINKS, backend=backend)
    generate(fused_llama, ref, ids)
    n = len(ref.layers[0].key_store) - 1
    assert n == prompt_len + NEW - 1 - (WINDOW + 1) - SINKS
    for side, store in enumerate((ref.layers[0].key_store, ref.layers[0].value_store)):
        assert torch.equal(layer.codes[side][:, :n], store.codes.view()[:, :n])
    if not outliers:
        assert layer.slots == (0, 0) and layer.memory()["outliers"] == 0
        return
    # the same exact coordinates: the growing cache's CSR entries, scattered, equal the static slots, scattered
    assert layer.slots == (cfg.outlier_cap, cfg.outlier_cap)
    stores = (ref.layers[0].key_store, ref.layers[0].value_store)
    for side, q in enumerate(layer.quantizers):
        held = layer._packed(side).outliers
        assert int(held.counts[:, :n].sum()) > 0, "the calibration kept no outliers in this text: the test is vacuous"
        shape = (ids.shape[0], q.num_heads, n, q.head_dim)
        want_z = q.apply_outliers(torch.zeros(shape), _first_tokens(stores[side].outliers.view(), n))
        got_z = q.apply_outliers(torch.zeros(shape[:2] + (layer.rows, shape[3])), held)
        assert torch.equal(got_z[:, :, :n], want_z)


def test_default_outlier_slots_are_the_average_rounded_up(fused_llama: Any, outlier_calibration: Any) -> None:
    """By default a token gets its calibration's average outlier count rounded up (at most the cap): static buffers
    pay for every slot, and on SmolLM2 that count measured best for the bits stored (docs/results/outlier_slots)."""
    from spectralkv.static import default_outlier_slots

    coords = outlier_calibration.num_kv_heads * outlier_calibration.head_dim  # 32 here
    for fraction, want in ((0.001, 1), (1 / 32, 1), (0.05, 2), (0.2, 7)):
        cfg = copy.copy(outlier_calibration)
        cfg.outlier_fraction = fraction
        assert default_outlier_slots(cfg) == want, fraction
        assert want <= cfg.outlier_cap
    smollm2_like = 0.0057 * 3 * 64  # 1.09 outliers per token on average, cap 5
    assert math.ceil(smollm2_like) == 2 and max(2, math.ceil(4 * smollm2_like)) == 5
    assert default_outlier_slots(outlier_calibration.without_outliers()) is None
    want = max(1, math.ceil(outlier_calibration.outlier_fraction * coords))
    cache = static_cache(fused_llama, outlier_calibration)
    generate(fused_llama, cache, prompt())
    assert cache.layers[0].slots == (min(want, outlier_calibration.outlier_cap),) * 2
    assert cache.outlier_slots == default_outlier_slots(outlier_calibration)


def _first_tokens(outliers: Any, n: int) -> Any:
    """The CSR outliers of the first ``n`` tokens (token-major entries: a prefix)."""
    from spectralkv.quantizer import Outliers

    counts = outliers.counts[:, :n]
    e = int(counts.sum())
    return Outliers(counts, outliers.index[:e], outliers.values[:e])


def test_reset_reuses_the_buffers(fused_llama: Any, tiny_llama_calibration: Any) -> None:
    """A second generate after ``reset`` gives the first one's result in the same buffers (so a compiled step stays
    valid)."""
    cfg = tiny_llama_calibration.without_outliers()
    cache = static_cache(fused_llama, cfg)
    first = generate(fused_llama, cache, prompt())
    addresses = [t.data_ptr() for t in (cache.layers[0].keys, *cache.layers[0].codes)]
    cache.reset()
    assert int(cache.layers[0].cumulative_length) == 0
    again = generate(fused_llama, cache, prompt())
    assert torch.equal(first.sequences, again.sequences)
    assert addresses == [t.data_ptr() for t in (cache.layers[0].keys, *cache.layers[0].codes)]
    report = cache.memory_report()
    assert report["codes_bytes"] > 0 and report["max_cache_len"] == PROMPT + NEW


def test_beam_search_reorders_in_place(fused_llama: Any, outlier_calibration: Any) -> None:
    """Beam search reorders the static buffers (codes and outlier slots) in place, with the growing fused cache's
    result."""
    from spectralkv.fused import FusedSpectralKVCache

    cfg = outlier_calibration
    ids = prompt(batch=1)
    kwargs = dict(num_beams=3, num_return_sequences=2)
    want = generate(fused_llama, FusedSpectralKVCache(fused_llama, cfg, window=WINDOW, sink_tokens=SINKS,
                                                      backend="torch"), ids, **kwargs)
    cache = static_cache(fused_llama, cfg, outlier_slots=cfg.outlier_cap)
    got = generate(fused_llama, cache, ids, **kwargs)
    assert cache.layers[0].keys.shape[0] == 3  # one row per beam
    assert torch.equal(got.sequences, want.sequences)


@pytest.mark.parametrize("outliers", [False, True], ids=lambda o: "outliers" if o else "no-outliers")
@pytest.mark.parametrize("kernel_backend", ["torch", "triton"])
def test_compiled_decode_is_one_graph(fused_llama: Any, request: Any, kernel_backend: str, outliers: bool) -> None:
    """``generate`` compiles the decode step (fullgraph, through AOT autograd's functionalisation of the in-place
    updates) once: every later step and a second generate after ``reset`` reuse it, with the eager result. With the
    Triton kernels (the interpreter here) each is one ``spectralkv::`` op in the graph. Exact outliers in fixed slots
    need no host synchronisation, so they compile too."""
    from transformers import CompileConfig

    cfg = calibration(request, outliers)
    eager = generate(fused_llama, static_cache(fused_llama, cfg, backend=kernel_backend), prompt())
    graphs: list[int] = []
    ops: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        from torch._dynamo.backends.common import aot_autograd

        graphs.append(len(gm.graph.nodes))
        ops.extend(str(n.target) for n in gm.graph.nodes if str(n.target).startswith("spectralkv."))
        return aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    config = CompileConfig(backend=backend, fullgraph=True, mode=None)
    config._compile_all_devices = True  # generate compiles on CUDA only unless told
    cache = static_cache(fused_llama, cfg, backend=kernel_backend)
    try:
        compiled = generate(fused_llama, cache, prompt(), compile_config=config)
        cache.reset()
        again = generate(fused_llama, cache, prompt(), compile_config=config)
    finally:
        for name in ("_compiled_call", "_last_compile_config"):
            fused_llama.__dict__.pop(name, None)
        torch._dynamo.reset()
    assert len(graphs) == 1, f"{len(graphs)} graphs compiled (recompilation or graph break)"
    layers = len(cache.layers)
    if kernel_backend == "triton":  # per layer one attention op and one write per side, each an opaque node
        assert sorted(set(ops)) == ["spectralkv.decode_attention_packed.default", "spectralkv.encode_packed.default"]
        assert ops.count("spectralkv.decode_attention_packed.default") == layers
        assert ops.count("spectralkv.encode_packed.default") == 2 * layers
    else:
        assert ops == []
    assert_same_generation(compiled, eager)
    assert torch.equal(again.sequences, eager.sequences)


def test_sliding_window_layers_stay_transformers_static(tiny_factory: Any) -> None:
    """Gemma3-style alternating layers: the sliding ones are transformers' static sliding layers, the full ones
    compressed, with the growing fused cache's result."""
    from transformers.cache_utils import StaticSlidingWindowLayer

    from spectralkv.fused import FusedSpectralKVCache, enable_fused
    from spectralkv.static import StaticCompressedLayer

    model = tiny_factory("gemma3_text", sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    cfg = tiny_calibrate(model).without_outliers()
    enable_fused(model)
    ids = prompt()
    want = generate(model, FusedSpectralKVCache(model, cfg, window=WINDOW, sink_tokens=SINKS, backend="torch"), ids)
    cache = static_cache(model, cfg)
    assert [type(layer) for layer in cache.layers] == [StaticSlidingWindowLayer, StaticCompressedLayer]
    assert_same_generation(generate(model, cache, ids), want)


# -- what static buffers cannot hold --------------------------------------------------------------------------------
def test_fewer_outlier_slots_keep_each_tokens_largest(fused_llama: Any, outlier_calibration: Any) -> None:
    """``outlier_slots`` below the cap: smaller buffers, and each token keeps its largest outliers (what the
    quantizer's slot finder picks with that many slots)."""
    cap = outlier_calibration.outlier_cap
    assert cap >= 2
    full = static_cache(fused_llama, outlier_calibration, outlier_slots=cap)
    one = static_cache(fused_llama, outlier_calibration, outlier_slots=1)
    generate(fused_llama, full, prompt())
    generate(fused_llama, one, prompt())
    a, b = full.layers[0], one.layers[0]
    assert b.slots == (1, 1) and a.slots == (cap, cap)
    assert b.memory()["outliers"] < a.memory()["outliers"]
    assert full.memory_report()["resident_bytes"] - one.memory_report()["resident_bytes"] == (
        full.memory_report()["outliers_bytes"] - one.memory_report()["outliers_bytes"])
    n = b.rows
    for side in (0, 1):
        many, single = a._packed(side).outliers, b._packed(side).outliers
        # the token's largest outlier is the first slot of both (slots are in decreasing magnitude)
        has = many.counts[:, :n] > 0
        assert bool(has.any())
        assert torch.equal(single.counts[:, :n], has.to(single.counts.dtype))
        assert torch.equal(single.index[:, :n, 0][has], many.index[:, :n, 0][has])
        assert torch.equal(single.values[:, :n, 0][has], many.values[:, :n, 0][has])


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_refuses_bad_outlier_slots(fused_llama: Any, outlier_calibration: Any, bad: Any) -> None:
    with pytest.raises(ValueError, match="outlier_slots must be an integer >= 1"):
        static_cache(fused_llama, outlier_calibration, outlier_slots=bad)


def test_refuses_other_attention(tiny_llama: Any, tiny_llama_calibration: Any) -> None:
    with pytest.raises(ValueError, match=r"enable_fused\(model\)"):
        static_cache(tiny_llama, tiny_llama_calibration.without_outliers())


def test_refuses_padded_batches(fused_llama: Any, tiny_llama_calibration: Any) -> None:
    cfg = tiny_llama_calibration.without_outliers()
    ids = prompt()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="padded batches"):
        fused_llama.generate(input_ids=ids, attention_mask=mask, cache=static_cache(fused_llama, cfg),
                             max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="padded batches"):
        static_cache(fused_llama, cfg).set_left_padding(mask)


def test_refuses_overflow_and_chunked_steps(fused_llama: Any, tiny_llama_calibration: Any) -> None:
    cfg = tiny_llama_calibration.without_outliers()
    with pytest.raises(ValueError, match="max_cache_len >= prompt length"):
        generate(fused_llama, static_cache(fused_llama, cfg, max_cache_len=PROMPT + 3), prompt())
    cache = static_cache(fused_llama, cfg)
    fused_llama(input_ids=prompt(), cache=cache)
    with pytest.raises(NotImplementedError, match="one token per step"):
        fused_llama(input_ids=prompt(length=2), cache=cache)
    with pytest.raises(ValueError, match="max_cache_len must be an integer"):
        static_cache(fused_llama, cfg, max_cache_len=0)


def test_refuses_soft_capping_models(tiny_gemma2: Any, tiny_gemma2_calibration: Any) -> None:
    """Gemma2 soft-caps attention logits; the kernel does not, so the cache refuses before anything runs."""
    from spectralkv.fused import enable_fused

    model = copy.deepcopy(tiny_gemma2)
    enable_fused(model)
    with pytest.raises(ValueError, match="soft-caps its attention logits"):
        static_cache(model, tiny_gemma2_calibration.without_outliers())


def test_refuses_uncompressed_full_attention_layers(fused_llama: Any, tiny_llama_calibration: Any) -> None:
    cfg = copy.copy(tiny_llama_calibration.without_outliers())
    cfg.compressed_layers = [1]
    with pytest.raises(ValueError, match="Layer 0 .* not compressed"):
        static_cache(fused_llama, cfg)

