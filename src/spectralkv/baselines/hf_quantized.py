"""transformers' own ``QuantizedCache``, for every backend that can run here.

https://huggingface.co/docs/transformers/kv_cache#quantized-cache (KIVI-inspired; backends ``quanto``
(optimum-quanto, 2 or 4 bits), ``hqq`` (1, 2, 3, 4 or 8 bits) and ``fp8`` (float8 e4m3, one per-tensor scale frozen at
the first update)). It is used as transformers ships it: it does not share spectralkv's sinks and recent window
(``quanto``/``hqq`` keep up to ``residual_length`` = 128 recent tokens in full precision; ``fp8`` keeps none), it
dequantizes the whole cache every step, and it refuses models with sliding-window layers.

Bits per compressed coordinate: ``fp8`` 8 plus one fp32 scale per layer and K/V (amortised over the tokens);
``quanto``/``hqq`` ``bits`` plus an fp16 scale and zero per group of ``q_group_size`` = 64 coordinates.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from transformers.cache_utils import Cache, Fp8QuantizedLayer, QuantizedCache, QuantizedLayer

from .common import kv_geometry

#: backend -> (bits it serves, the module it needs, or None)
BACKENDS: dict[str, tuple[tuple[int, ...], str | None]] = {
    "fp8": ((8,), None),
    "quanto": ((2, 4), "optimum.quanto"),
    "hqq": ((1, 2, 3, 4, 8), "hqq"),
}
GROUP_METADATA_BITS = 32  # fp16 scale + fp16 zero per group (quanto/hqq)


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def backend_unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run here, or None when it can."""
    if backend not in BACKENDS:
        return f"unknown QuantizedCache backend {backend!r} (known: {', '.join(BACKENDS)})"
    module = BACKENDS[backend][1]
    if module is not None and not _module_available(module):
        package = "optimum-quanto" if backend == "quanto" else backend
        return f"the `{backend}` backend needs `{package}`, which is not installed (pip install {package})"
    return None


def backend_bits(backend: str) -> tuple[int, ...]:
    """Code bits ``backend`` supports."""
    return BACKENDS[backend][0]


def hf_quantized_cache(model: Any, backend: str, bits: int) -> Cache:
    """transformers' ``QuantizedCache`` with ``backend`` at ``bits`` (fp8: 8 only)."""
    reason = backend_unavailable(backend)
    if reason:
        raise RuntimeError(f"QuantizedCache({backend!r}) cannot run: {reason}.")
    if bits not in backend_bits(backend):
        raise ValueError(f"The `{backend}` backend supports bits {backend_bits(backend)}, got {bits!r}.")
    config = getattr(model, "config", model)
    if backend == "fp8":
        return QuantizedCache(backend="fp8", config=config)
    return QuantizedCache(backend=backend, config=config, nbits=int(bits))


def hf_quantized_bits_per_coordinate(cache: Cache, model: Any) -> float | None:
    """Bits per quantized coordinate of a used ``QuantizedCache`` (codes + scales), or None before any token."""
    heads, head_dim = kv_geometry(model)
    total_bits = 0.0
    coords = 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        if isinstance(layer, Fp8QuantizedLayer):
            n = layer.cumulative_length
            total_bits += 2 * (n * heads * head_dim * 8 + 32)
            coords += 2 * n * heads * head_dim
        elif isinstance(layer, QuantizedLayer):
            n = layer.cumulative_length - (layer.keys.shape[-2] if layer.keys.dim() == 4 else 0)
            total_bits += 2 * n * heads * head_dim * (layer.nbits + GROUP_METADATA_BITS / layer.q_group_size)
            coords += 2 * n * heads * head_dim
    return total_bits / coords if coords else None
