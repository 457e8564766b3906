"""Share one exact prefill between methods: capture its keys/values once, replay them into each method's cache.

A prefill forward writes the prompt's keys/values into the cache and attends to them; every cache in the harness
returns a prompt's own keys/values unchanged on its first ``update`` (compression applies to tokens *already* in
the cache), so the prefill's activations do not depend on the method, only the cache state it leaves behind does.
Replaying the captured keys/values through ``cache.update`` (the same call the attention layers make) therefore
leaves exactly the state a prefill with that cache would, at a fraction of the cost. :func:`replay_prefill`
checks the premise and falls back to a real prefill forward for a cache that alters the prompt's keys/values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

from ..capture import capture_attention
from ..compat import cache_kwarg


@dataclass
class CapturedPrefill:
    """Per layer ``[B, H, T, D]`` keys and values of an exact prefill (queries ``[B, Hq, T, D]`` when asked for),
    plus each attention module (for ``scaling`` and ``o_proj``)."""

    input_ids: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    queries: list[torch.Tensor] | None
    modules: list[torch.nn.Module]


def capture_prefill(model: Any, input_ids: torch.Tensor, *, queries: bool = False) -> CapturedPrefill:
    """Run one exact forward over ``input_ids`` (``[B, T]``, no cache) and keep every layer's keys/values."""
    found: dict[int, tuple[torch.nn.Module, torch.Tensor | None, torch.Tensor, torch.Tensor]] = {}

    def callback(layer: int, module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        found[layer] = (module, q.detach() if queries else None, k.detach(), v.detach())

    device = next(model.parameters()).device
    ids = input_ids.to(device)
    with torch.inference_mode(), capture_attention(model, callback):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    layers = sorted(found)
    if layers != list(range(len(layers))):
        raise RuntimeError(f"Captured attention layers {layers} are not 0..n-1; cannot replay them into a cache.")
    return CapturedPrefill(
        input_ids=ids,
        keys=[found[i][2] for i in layers],
        values=[found[i][3] for i in layers],
        queries=[found[i][1] for i in layers] if queries else None,  # type: ignore[misc]
        modules=[found[i][0] for i in layers],
    )


def _slice(x: torch.Tensor, stop: int | None) -> torch.Tensor:
    return x if stop is None else x[:, :, :stop]


def replay_prefill(model: Any, factory: Callable[[], Cache], captured: CapturedPrefill, length: int | None = None
                   ) -> tuple[Cache, bool]:
    """A fresh cache from ``factory`` holding the first ``length`` captured tokens (all by default).

    Returns ``(cache, replayed)``; ``replayed`` is False when the cache altered the prompt's own keys/values on
    its first update, in which case the cache was filled by a real prefill forward instead."""
    cache = factory()
    exact = True
    with torch.inference_mode():
        for layer, (k, v) in enumerate(zip(captured.keys, captured.values, strict=True)):
            k, v = _slice(k, length), _slice(v, length)
            kk, vv = cache.update(k, v, layer)
            if kk.shape != k.shape or vv.shape != v.shape or not (torch.equal(kk, k) and torch.equal(vv, v)):
                exact = False
                break
        if exact:
            return cache, True
        cache = factory()
        ids = captured.input_ids if length is None else captured.input_ids[:, :length]
        model(input_ids=ids, **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
    return cache, False
