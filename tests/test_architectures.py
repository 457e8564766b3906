"""Every supported family, as a tiny random model: calibrate, attach, greedy-generate past the sliding window.

Full-attention layers must be CompressedLayer (holding codes), sliding-window layers transformers' own
DynamicSlidingWindowLayer in full precision, and generation must run end to end over a prompt longer than the window.
One table drives it, so a new family is one new row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import tiny_calibrate
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from spectralkv import SpectralKVCache, attached
from spectralkv.fingerprint import UnsupportedArchitectureError
from spectralkv.layer_base import CompressedLayer

SLIDING = 8
PROMPT_LEN = 40  # > SLIDING, > sinks + window
ALT = ["sliding_attention", "full_attention"]

# id: (model_type, config overrides, expected kind per layer: "c" compressed, "s" sliding fp)
CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama": ("llama", {}, "cc"),
    "qwen2": ("qwen2", {}, "cc"),
    "qwen2-sliding-upper-layers": ("qwen2", dict(use_sliding_window=True, sliding_window=SLIDING,
                                                 max_window_layers=1), "cs"),
    "qwen2-layer-types": ("qwen2", dict(use_sliding_window=True, sliding_window=SLIDING, layer_types=ALT), "sc"),
    "qwen3": ("qwen3", {}, "cc"),
    "mistral-no-sliding": ("mistral", dict(sliding_window=None), "cc"),
    "gemma": ("gemma", {}, "cc"),
    "gemma2-alternating": ("gemma2", dict(sliding_window=SLIDING, layer_types=ALT), "sc"),
    "gemma3-alternating": ("gemma3_text", dict(sliding_window=SLIDING, layer_types=ALT), "sc"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_calibrate_attach_generate(case: str, tiny_factory: Callable[..., torch.nn.Module]) -> None:
    model_type, overrides, kinds = CASES[case]
    model = tiny_factory(model_type, **overrides)
    calibration = tiny_calibrate(model)
    assert calibration.compressed_layers == [i for i, k in enumerate(kinds) if k == "c"]
    ids = torch.randint(2, 256, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    with attached(model, calibration, window=4):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                             do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (1, PROMPT_LEN + 20)
    cache = out.cache
    assert isinstance(cache, SpectralKVCache)
    assert cache.get_seq_length() == PROMPT_LEN + 19
    for i, (layer, kind) in enumerate(zip(cache.layers, kinds, strict=True)):
        if kind == "c":
            assert isinstance(layer, CompressedLayer), i
            assert len(layer.key_store) == PROMPT_LEN + 19 - calibration.sink_tokens - 4
            assert layer.get_seq_length() == PROMPT_LEN + 19
        else:
            assert type(layer) is DynamicSlidingWindowLayer, i
            assert layer.sliding_window == SLIDING
            assert layer.keys.shape[2] == SLIDING - 1  # bounded, full precision
    report = cache.memory_report()
    assert report["compressed_tokens"] == PROMPT_LEN + 19 - calibration.sink_tokens - 4
    assert (report["other_layers_bytes"] > 0) == ("s" in kinds)


def test_all_sliding_mistral_has_nothing_to_compress(tiny_factory: Callable[..., torch.nn.Module]) -> None:
    """Mistral with a sliding window on every layer: each window is bounded and stays fp; calibrating says so."""
    model = tiny_factory("mistral", sliding_window=SLIDING)
    with pytest.raises(ValueError, match="sliding-window layer"):
        tiny_calibrate(model)


def test_sliding_window_layers_match_the_fp_model_exactly(tiny_factory: Callable[..., torch.nn.Module]) -> None:
    """With every compressed token kept in fp (huge window), the hybrid cache is bit-identical to DynamicCache:
    sliding layers are untouched and masks/positions line up."""
    model = tiny_factory("gemma2", sliding_window=SLIDING, layer_types=ALT)
    calibration = tiny_calibrate(model)
    ids = torch.randint(2, 256, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, return_dict_in_generate=True,
              output_logits=True)
    ref = model.generate(ids, **kw)
    with attached(model, calibration, window=1000):
        out = model.generate(ids, **kw)
    assert isinstance(out.cache, SpectralKVCache)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits, strict=True))


def test_unsupported_architecture(tiny_factory: Callable[..., torch.nn.Module], tiny_llama_calibration: Any) -> None:
    gpt2 = tiny_factory("gpt2", n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1)
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        tiny_calibrate(gpt2)
    with pytest.raises(UnsupportedArchitectureError, match="supported: llama"):
        SpectralKVCache(gpt2, tiny_llama_calibration)


def test_dynamic_layer_is_the_base_of_compressed_layers() -> None:
    """CompressedLayer must stay a DynamicLayer: generate's cache checks and batch utilities rely on that type."""
    assert issubclass(CompressedLayer, DynamicLayer)
    assert CompressedLayer._layer_type is None  # setting it would hijack every DynamicCache in the process
