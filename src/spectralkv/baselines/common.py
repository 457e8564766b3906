"""Building blocks shared by the baselines: a cache made of ``CompressedLayer`` s around any ``TokenStore``.

Every compressed method in the harness (spectralkv, KIVI-style, TurboQuant-style) is the same
:class:`~spectralkv.layer_base.CompressedLayer` (full-precision sinks, compressed middle, full-precision recent
window, same flushing rule) with a different store, so a comparison between them measures the stores alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, get_layer_types_and_kwargs

from ..fingerprint import SLIDING_TYPES
from ..layer_base import CompressedLayer, TokenStore

#: ``factory(layer_idx, kind)`` -> a fresh store; ``kind`` is ``"k"`` or ``"v"``
LayerStoreFactory = Callable[[int, str], TokenStore]


def text_config(model_or_config: Any) -> Any:
    """The decoder text config of a model or config."""
    config = getattr(model_or_config, "config", model_or_config)
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def kv_geometry(model_or_config: Any) -> tuple[int, int]:
    """``(num_key_value_heads, head_dim)`` of a model."""
    cfg = text_config(model_or_config)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return kv_heads, head_dim


def compressed_cache(model: Any, store: LayerStoreFactory, *, sink_tokens: int, window: int) -> Cache:
    """A ``Cache`` whose full-attention layers are ``CompressedLayer(store(i, "k"), store(i, "v"))``.

    Sliding-window layers keep transformers' own bounded full-precision layers (as :class:`SpectralKVCache` does).
    """
    if sink_tokens < 0 or window < 0:
        raise ValueError(f"`sink_tokens` and `window` must be >= 0, got {sink_tokens} and {window}.")
    layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config(model))
    layers = []
    for i, (lt, kw) in enumerate(zip(layer_types, layer_kwargs, strict=True)):
        if lt in SLIDING_TYPES:
            layers.append(DYNAMIC_LAYER_TYPE_MAPPING[lt](**kw))
        else:
            layers.append(CompressedLayer(lambda i=i: store(i, "k"), lambda i=i: store(i, "v"), sink_tokens, window))
    return Cache(layers=layers)


def fp16_scale(x: torch.Tensor) -> torch.Tensor:
    """Round to what an fp16 field stores, back in float32 (metadata is always used as stored)."""
    return x.to(torch.float16).float()
