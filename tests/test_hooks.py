"""attach / detach / attached: the accelerate hook that swaps generate's fresh cache for a SpectralKVCache.

Tiny random Llamas for the mechanics (fresh per test where the test changes the model's hooks, so no state leaks
into the session fixtures); the real SmolLM2 only for ``pipeline``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from accelerate.hooks import ModelHook, SequentialHook, add_hook_to_module, remove_hook_from_module
from transformers import DynamicCache

from spectralkv import SpectralKVCache, attach, attached, detach
from spectralkv.fingerprint import IncompatibleCalibrationError, UnsupportedArchitectureError
from spectralkv.hooks import SpectralKVHook, is_attached
from spectralkv.layer_base import CompressedLayer

PROMPT_LEN = 40  # > sinks (4) + window (4) used below, so tokens really get compressed


@pytest.fixture
def model(tiny_factory: Callable[..., torch.nn.Module]) -> Iterator[torch.nn.Module]:
    """A fresh tiny Llama (same architecture as ``tiny_llama``, so ``tiny_llama_calibration`` fits it)."""
    m = tiny_factory("llama")
    yield m
    remove_hook_from_module(m)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(2, 256, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))


def greedy(model: torch.nn.Module, ids: torch.Tensor, **kw: Any) -> Any:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False, return_dict_in_generate=True, output_logits=True, **kw)


def spectral_hooks(model: torch.nn.Module) -> list[ModelHook]:
    hook = getattr(model, "_hf_hook", None)
    hooks = list(hook.hooks) if isinstance(hook, SequentialHook) else [hook] if hook else []
    return [h for h in hooks if isinstance(h, SpectralKVHook)]


class CountingHook(ModelHook):
    """Stands for someone else's hook (e.g. accelerate's dispatch hook): must survive attach and detach."""

    def __init__(self) -> None:
        self.calls = 0

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.calls += 1
        return args, kwargs


# -- attach / detach ------------------------------------------------------------------------------------------------


def test_attach_compresses_and_detach_restores_exact_fp(model: torch.nn.Module, prompt: torch.Tensor,
                                                        tiny_llama_calibration: Any) -> None:
    """Detach gives back bit-identical fp generation; while attached the cache really is compressed."""
    ref = greedy(model, prompt)
    assert type(ref.cache) is DynamicCache
    assert attach(model, tiny_llama_calibration, window=4) is model and is_attached(model)
    out = greedy(model, prompt)
    cache = out.cache
    assert isinstance(cache, SpectralKVCache)
    assert cache.memory_report()["compressed_tokens"] == PROMPT_LEN + 11 - 4 - 4
    assert not all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits, strict=True))  # compression is felt
    detach(model)
    assert not is_attached(model) and not hasattr(model, "_hf_hook")
    again = greedy(model, prompt)
    assert type(again.cache) is DynamicCache
    assert torch.equal(again.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(again.logits, ref.logits, strict=True))
    detach(model)  # detaching twice is a no-op


def test_attached_context_manager_detaches_even_on_error(model: torch.nn.Module, prompt: torch.Tensor,
                                                         tiny_llama_calibration: Any) -> None:
    with attached(model, tiny_llama_calibration, bits=4.0) as m:
        assert m is model and is_attached(model)
        assert spectral_hooks(model)[0].config.bits == 4.0
        assert isinstance(model(prompt).cache, SpectralKVCache)  # plain forward with a cache, too
    assert not is_attached(model)
    with pytest.raises(RuntimeError, match="boom"), attached(model, tiny_llama_calibration):
        assert is_attached(model)
        raise RuntimeError("boom")
    assert not is_attached(model)
    assert type(model(prompt).cache) is DynamicCache


def test_attach_twice_replaces_previous_hook(model: torch.nn.Module, prompt: torch.Tensor,
                                             tiny_llama_calibration: Any) -> None:
    attach(model, tiny_llama_calibration, bits=2.0)
    attach(model, tiny_llama_calibration, bits=4.0, window=6)
    hooks = spectral_hooks(model)
    assert len(hooks) == 1 and hooks[0].config.bits == 4.0 and hooks[0].window == 6
    assert not isinstance(model._hf_hook, SequentialHook)  # not chained onto the old one
    cache = greedy(model, prompt).cache
    assert cache.bits == 4.0 and cache.window == 6
    detach(model)
    assert not hasattr(model, "_hf_hook")


def test_foreign_hook_survives_attach_and_detach(model: torch.nn.Module, prompt: torch.Tensor,
                                                 tiny_llama_calibration: Any) -> None:
    other = CountingHook()
    add_hook_to_module(model, other)
    attach(model, tiny_llama_calibration)
    attach(model, tiny_llama_calibration)  # re-attaching keeps the foreign hook once
    chain = model._hf_hook
    assert isinstance(chain, SequentialHook)
    assert [type(h) for h in chain.hooks] == [CountingHook, SpectralKVHook] and chain.hooks[0] is other
    out = greedy(model, prompt)
    assert isinstance(out.cache, SpectralKVCache) and other.calls == 12
    detach(model)
    assert model._hf_hook is other
    out = greedy(model, prompt)
    assert type(out.cache) is DynamicCache and other.calls == 24


def test_user_cache_is_left_alone(model: torch.nn.Module, prompt: torch.Tensor, tiny_llama_calibration: Any) -> None:
    """A cache the user passes is theirs: an fp DynamicCache stays fp; an explicit SpectralKVCache is used as is."""
    attach(model, tiny_llama_calibration)
    mine = DynamicCache(config=model.config)
    out = greedy(model, prompt, cache=mine)
    assert out.cache is mine and mine.get_seq_length() == PROMPT_LEN + 11
    assert not any(isinstance(layer, CompressedLayer) for layer in mine.layers)
    custom = SpectralKVCache(model, tiny_llama_calibration, bits=2.0, window=2, sink_tokens=1)
    out = greedy(model, prompt, cache=custom)
    assert out.cache is custom and custom.layers[0].sink_keys.shape[2] == 1
    # use_cache=False: nothing to swap
    assert model(prompt, use_cache=False).cache is None


def test_quantizer_tensors_follow_the_data_device(model: torch.nn.Module, prompt: torch.Tensor,
                                                  tiny_llama_calibration: Any) -> None:
    """Each layer moves its quantizer tensors to the device of the states it receives (device_map splits layers
    across devices; dispatch hooks never move the cache). Simulated here with one layer on CPU, one on ``meta``."""
    attach(model, tiny_llama_calibration, window=4)
    cache = greedy(model, prompt).cache
    for layer in cache.layers:
        for store in (layer.key_store, layer.value_store):
            assert list(store.quantizer._device_cache) == [torch.device("cpu")]
            assert all(t.device.type == "cpu" for t in store.quantizer._device_cache[torch.device("cpu")])
    split = SpectralKVCache(model, tiny_llama_calibration, window=2, sink_tokens=1)
    for i, device in enumerate(("cpu", "meta")):
        k = torch.randn(1, 2, 9, 16, device=device)
        keys, _ = split.update(k, k.clone(), i)
        assert keys.device.type == device
        layer = split.layers[i]
        assert layer.key_store.codes.view().device.type == device
        assert list(layer.key_store.quantizer._device_cache) == [torch.device(device)]
        assert list(layer.key_store.quantizer._coord_cache) == [torch.device(device)]


# -- pipeline ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pipeline_uses_the_compressed_cache(smollm2: tuple[Any, Any], smollm2_calibration: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import pipeline

    model, tok = smollm2
    made: list[SpectralKVCache] = []
    original = SpectralKVHook.new_cache

    def spy(self: SpectralKVHook) -> SpectralKVCache:
        made.append(original(self))
        return made[-1]

    monkeypatch.setattr(SpectralKVHook, "new_cache", spy)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    with attached(model, smollm2_calibration, window=8):
        made.clear()  # attach builds one cache to validate the settings
        text = pipe(messages, max_new_tokens=8, do_sample=False)[0]["generated_text"][-1]["content"]
    assert len(made) == 1 and made[0].get_seq_length() > 8
    assert made[0].memory_report()["compressed_tokens"] > 0
    assert "Paris" in text
    assert not is_attached(model)


# -- errors --------------------------------------------------------------------------------------------------------


def test_calibration_for_another_model_is_refused(tiny_llama_calibration: Any,
                                                  tiny_factory: Callable[..., torch.nn.Module]) -> None:
    other = tiny_factory("llama", num_key_value_heads=4)
    with pytest.raises(IncompatibleCalibrationError, match="num_key_value_heads: calibration has 2, model has 4"):
        attach(other, tiny_llama_calibration)
    assert not is_attached(other)
    deeper = tiny_factory("llama", num_hidden_layers=3)
    with pytest.raises(IncompatibleCalibrationError, match="num_hidden_layers"):
        attach(deeper, tiny_llama_calibration)


@pytest.mark.parametrize("bits", [0, -1, 8.5, 9, float("nan"), "three"])
def test_budget_outside_range_is_refused(model: torch.nn.Module, tiny_llama_calibration: Any, bits: Any) -> None:
    with pytest.raises(ValueError, match=r"\(0, 8\]"):
        attach(model, tiny_llama_calibration, bits=bits)
    assert not is_attached(model)


def test_budget_below_the_scales_is_refused(model: torch.nn.Module, tiny_llama_calibration: Any) -> None:
    """With per-token scales the calibration cannot serve a budget the scales alone exceed."""
    scaled = dataclasses.replace(tiny_llama_calibration, token_scale=True)
    assert scaled.min_bits == 0.5  # a one-byte log8 scale per head and token over head_dim 16
    with pytest.raises(ValueError, match="too small"):
        attach(model, scaled, bits=0.25)
    assert not is_attached(model)
    attach(model, scaled, bits=0.75)  # just above is served
    assert is_attached(model)


def test_window_and_sinks_are_validated_at_attach(model: torch.nn.Module, tiny_llama_calibration: Any) -> None:
    with pytest.raises(ValueError, match="window"):
        attach(model, tiny_llama_calibration, window=-1)
    with pytest.raises(ValueError, match="sink_tokens"):
        attach(model, tiny_llama_calibration, sink_tokens=-2)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="flush_block"):
            attach(model, tiny_llama_calibration, flush_block=bad)
    assert not is_attached(model)
    attach(model, tiny_llama_calibration, fused=True, flush_block=16)
    try:
        from spectralkv.hooks import _hooks_of

        assert [h.new_cache().flush_block for h in _hooks_of(model) if hasattr(h, "new_cache")] == [16]
    finally:
        detach(model)


def test_not_a_generative_model_is_refused(tiny_llama_calibration: Any, tiny_llama: torch.nn.Module) -> None:
    from transformers import AutoModel

    with pytest.raises(TypeError, match="generative model"):
        attach(torch.nn.Linear(2, 2), tiny_llama_calibration)
    base = AutoModel.from_config(tiny_llama.config)  # LlamaModel: no LM head, no generate
    with pytest.raises(TypeError, match="generative model"):
        attach(base, tiny_llama_calibration)


def test_unsupported_architecture_is_refused(tiny_llama_calibration: Any,
                                            tiny_factory: Callable[..., torch.nn.Module]) -> None:
    gpt2 = tiny_factory("gpt2", n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1)
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'gpt2'"):
        attach(gpt2, tiny_llama_calibration)


def test_padded_batch_declares_left_padding(model: torch.nn.Module, tiny_llama_calibration: Any) -> None:
    """The hook reads generate's attention mask on the prefill, so each left-padded row keeps its own sinks exact
    and decodes exactly as it would alone."""
    g = torch.Generator().manual_seed(5)
    short, long = torch.randint(2, 256, (1, 30), generator=g), torch.randint(2, 256, (1, 45), generator=g)
    ids = torch.cat([torch.cat([torch.zeros(1, 15, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :15] = 0
    kw = dict(max_new_tokens=15, min_new_tokens=15, do_sample=False, pad_token_id=0)
    with attached(model, tiny_llama_calibration, window=4):
        out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kw)
        alone = [model.generate(x, attention_mask=torch.ones_like(x), **kw) for x in (short, long)]
    assert all(layer.left_padding.tolist() == [15, 0] for layer in out.cache.layers)
    assert torch.equal(out.sequences[0, 45:], alone[0][0, 30:])
    assert torch.equal(out.sequences[1, 45:], alone[1][0, 45:])


def test_chunked_prefill_keeps_one_cache(model: torch.nn.Module, prompt: torch.Tensor, tiny_llama_calibration: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``prefill_chunk_size`` generate passes the cache from chunk to chunk: the hook must swap only once."""
    made: list[SpectralKVCache] = []
    original = SpectralKVHook.new_cache
    attach(model, tiny_llama_calibration, window=4)
    monkeypatch.setattr(SpectralKVHook, "new_cache", lambda self: made.append(original(self)) or made[-1])
    out = greedy(model, prompt, prefill_chunk_size=16)
    assert len(made) == 1 and out.cache is made[0]
    assert made[0].get_seq_length() == PROMPT_LEN + 11


def test_attach_fused_routes_decode_through_packed_attention_and_detach_restores(
    tiny_llama: torch.nn.Module, tiny_llama_calibration: Any
) -> None:
    """attach(fused=True) swaps the attention implementation and cache class; detach puts the original back; the
    fused path gives the same greedy tokens as the unfused compressed cache."""
    from spectralkv.fused import FusedSpectralKVCache

    ids = torch.randint(2, 250, (1, 40), generator=torch.Generator().manual_seed(3))
    before = tiny_llama.config._attn_implementation
    with attached(tiny_llama, tiny_llama_calibration, window=4):
        plain = tiny_llama.generate(ids, max_new_tokens=6, do_sample=False)
    with attached(tiny_llama, tiny_llama_calibration, window=4, fused=True):
        assert tiny_llama.config._attn_implementation == "spectralkv_fused"
        out = tiny_llama.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        assert isinstance(out.cache, FusedSpectralKVCache)
    assert tiny_llama.config._attn_implementation == before
    assert torch.equal(out.sequences, plain)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_hook_swaps_the_cache_under_the_name_it_came_in(model: torch.nn.Module, tiny_llama_calibration: Any,
                                                        name: str) -> None:
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; the hook must replace whichever generate passed
    and never add the other name (the model would then see two caches and drop ours)."""
    from spectralkv.compat import cache_kwarg, output_cache

    hook = SpectralKVHook(model, tiny_llama_calibration, window=4, sink_tokens=None)
    _, kwargs = hook.pre_forward(model, **{name: DynamicCache(config=model.config), "use_cache": True})
    assert isinstance(kwargs[name], SpectralKVCache)
    assert set(kwargs) == {name, "use_cache"}
    _, kwargs = hook.pre_forward(model, use_cache=True)  # a plain forward: the name the model's signature takes
    assert list(kwargs) == ["use_cache", cache_kwarg(model)]
    with attached(model, tiny_llama_calibration, window=4):
        out = model(torch.randint(2, 256, (1, 12)), use_cache=True)
    assert isinstance(output_cache(out), SpectralKVCache)
