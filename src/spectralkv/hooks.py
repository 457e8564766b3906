"""Attach spectralkv to a model with an accelerate ``ModelHook``: no model code is patched, detach restores it.

The hook's ``pre_forward`` swaps the fresh, empty ``DynamicCache`` that ``generate`` creates (or the cache a plain
forward would create) for a :class:`SpectralKVCache`; ``generate`` then carries our cache from step to step. A cache
the user passed explicitly (``_is_user_defined``) or one that already holds tokens is never touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.hooks import ModelHook, SequentialHook, add_hook_to_module, remove_hook_from_module
from transformers.cache_utils import DynamicCache

from .cache import SpectralKVCache
from .compat import CACHE_NAMES, cache_kwarg
from .config import SpectralKVConfig


class SpectralKVHook(ModelHook):
    """Makes every forward with a cache use a fresh :class:`SpectralKVCache`."""

    def __init__(self, model: Any, config: SpectralKVConfig, window: int | None, sink_tokens: int | None,
                 fused: bool = False, flush_block: int = 1) -> None:
        self.config = config
        self.window = window
        self.sink_tokens = sink_tokens
        self.flush_block = flush_block
        self.fused = fused
        self.previous_attn_implementation: str | None = None
        self._model_config = model.config

    def new_cache(self) -> SpectralKVCache:
        if self.fused:
            from .fused import FusedSpectralKVCache

            return FusedSpectralKVCache(self._model_config, self.config, window=self.window,
                                        sink_tokens=self.sink_tokens, flush_block=self.flush_block)
        return SpectralKVCache(self._model_config, self.config, window=self.window, sink_tokens=self.sink_tokens,
                               flush_block=self.flush_block)

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", True)
        if not use_cache:
            return args, kwargs
        # generate passes the cache as ``cache`` (transformers >= 5.24) or ``past_key_values``: replace it under the
        # name it came in, or the model would see two caches and ignore ours.
        key = next((name for name in CACHE_NAMES if name in kwargs), None) or cache_kwarg(module)
        pkv = kwargs.get(key)
        if pkv is None or (
            type(pkv) is DynamicCache and not getattr(pkv, "_is_user_defined", False) and pkv.get_seq_length() == 0
        ):
            cache = self.new_cache()
            cache.set_left_padding(kwargs.get("attention_mask"))  # keep each padded row's own sinks exact
            kwargs[key] = cache
        return args, kwargs


def _hooks_of(model: torch.nn.Module) -> list[ModelHook]:
    hook = getattr(model, "_hf_hook", None)
    if hook is None:
        return []
    return list(hook.hooks) if isinstance(hook, SequentialHook) else [hook]


def is_attached(model: torch.nn.Module) -> bool:
    return any(isinstance(h, SpectralKVHook) for h in _hooks_of(model))


def attach(
    model: torch.nn.Module,
    config: SpectralKVConfig | str,
    *,
    bits: float | None = None,
    window: int | None = None,
    sink_tokens: int | None = None,
    fused: bool = False,
    flush_block: int = 1,
) -> torch.nn.Module:
    """Make ``model`` use a compressed KV cache in every ``generate``/forward with a cache.

    ``config`` is a :class:`SpectralKVConfig` or a folder/Hub id to load one from. It is checked against the model
    first. Attaching again replaces the previous spectralkv hook (other hooks, e.g. ``device_map``, are kept).
    ``fused=True`` also switches the model to the ``"spectralkv_fused"`` attention implementation, so decode steps
    attend straight from the packed codes (Triton on GPU, the PyTorch reference on CPU); detach restores the
    previous implementation. ``flush_block`` > 1 compresses tokens leaving the window in blocks (see
    :class:`~spectralkv.layer_base.CompressedLayer`).
    """
    if not isinstance(config, SpectralKVConfig):
        config = SpectralKVConfig.from_pretrained(config)
    if getattr(model, "config", None) is None or not hasattr(model, "generate"):
        raise TypeError(f"attach() needs a transformers generative model, got {type(model).__name__}.")
    if getattr(model.config, "is_encoder_decoder", False):
        raise TypeError("attach() supports decoder-only models; this model is an encoder-decoder.")
    config.check_compatible(model)
    if bits is not None:
        config = config.with_bits(bits)
    hook = SpectralKVHook(model, config, window, sink_tokens, fused, flush_block)
    hook.new_cache()  # validate window/sinks/budget now, not at the first generate
    detach(model)
    if fused:
        from .fused import enable_fused

        hook.previous_attn_implementation = enable_fused(model)
    add_hook_to_module(model, hook, append=True)
    return model


def detach(model: torch.nn.Module) -> torch.nn.Module:
    """Remove spectralkv's hook only; any other accelerate hooks stay in place. No-op if not attached."""
    hooks = _hooks_of(model)
    if not any(isinstance(h, SpectralKVHook) for h in hooks):
        return model
    others = [h for h in hooks if not isinstance(h, SpectralKVHook)]
    for h in hooks:
        if isinstance(h, SpectralKVHook) and h.previous_attn_implementation is not None:
            model.set_attn_implementation(h.previous_attn_implementation)
    remove_hook_from_module(model)
    for h in others:
        add_hook_to_module(model, h, append=True)
    return model


@contextmanager
def attached(model: torch.nn.Module, config: SpectralKVConfig | str, **kwargs: Any) -> Iterator[torch.nn.Module]:
    """``with attached(model, cfg): ...`` for pipelines and apps; detaches on exit, even on error."""
    attach(model, config, **kwargs)
    try:
        yield model
    finally:
        detach(model)
