"""Every method the harness compares, behind one factory: ``make_cache(method, model, bits, ...)``.

Methods and how they read ``bits``:

- ``fp16``: transformers' ``DynamicCache`` in the model's own dtype (the reference; ``bits`` ignored).
- ``spectralkv``: :class:`~spectralkv.cache.SpectralKVCache`; ``bits`` is the all-in budget per coordinate
  (codes + per-token scales). Needs a calibration.
- ``kivi``: :mod:`spectralkv.baselines.kivi`; ``bits`` is the integer code width (metadata comes on top).
- ``turboquant``: :mod:`spectralkv.baselines.turboquant`; ``bits`` is the code width, fractional allowed (the
  fp16 norm comes on top).
- ``hf-quantized``: transformers' ``QuantizedCache``; ``bits`` picks the backend (8: ``fp8``; others ``quanto`` /
  ``hqq`` where installed).

Every result row reports the *measured* bits per compressed coordinate (codes + all metadata, from the stores the
run used), so methods are compared at their true cost, whatever their nominal ``bits``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache

from ..baselines.common import kv_geometry
from ..baselines.hf_quantized import (
    BACKENDS,
    backend_bits,
    backend_unavailable,
    hf_quantized_bits_per_coordinate,
    hf_quantized_cache,
)
from ..baselines.kivi import kivi_cache
from ..baselines.turboquant import turboquant_cache
from ..layer_base import CompressedLayer, GrowableBuffer, TokenStore

METHODS = ("fp16", "spectralkv", "kivi", "turboquant", "hf-quantized")
DEFAULT_WINDOW = 32
DEFAULT_SINK_TOKENS = 4

DESCRIPTIONS = {
    "fp16": "full-precision DynamicCache (reference, model dtype)",
    "spectralkv": "calibrated eigenbasis, Lloyd-Max codes, allocated bits (this library)",
    "kivi": "KIVI-style: keys per channel / values per token, min-max, groups of 32 (arXiv:2402.02750)",
    "turboquant": "TurboQuant-style: random rotation, Gaussian Lloyd-Max, fp16 norm, no QJL (arXiv:2504.19874)",
    "hf-quantized": "transformers QuantizedCache (no sinks/window; fp8: per-tensor scale)",
}


class MethodUnavailable(RuntimeError):
    """A method cannot run here (missing package or calibration, unsupported budget); the message says why."""


@dataclass(frozen=True)
class RunSpec:
    """One method at one nominal budget: a row of the results table."""

    method: str
    bits: float | None
    backend: str | None = None

    @property
    def label(self) -> str:
        if self.method == "fp16":
            return "fp16"
        name = f"hf-{self.backend}" if self.method == "hf-quantized" else self.method
        return f"{name}@{self.bits:g}"


@dataclass(frozen=True)
class Skipped:
    method: str
    bits: float | None
    reason: str


def plan_runs(methods: Sequence[str], budgets: Sequence[float], calibration: Any = None,
              hf_budgets: Sequence[float] | None = None) -> tuple[list[RunSpec], list[Skipped]]:
    """The runs (and the skipped ones, with a reason) for ``methods`` x ``budgets``. ``fp16`` always runs once.

    ``hf_budgets``: the budgets transformers' ``QuantizedCache`` backends run at (``None``: ``budgets``); ``fp8``
    runs once, at its single operating point, either way.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    runs: list[RunSpec] = [RunSpec("fp16", None)]
    skipped: list[Skipped] = []
    for method in dict.fromkeys(methods):
        if method == "fp16":
            continue
        if method == "hf-quantized":
            for backend in BACKENDS:
                reason = backend_unavailable(backend)
                if reason:
                    skipped.append(Skipped(f"hf-{backend}", None, reason))
                    continue
                served = backend_bits(backend)
                hf = budgets if hf_budgets is None else hf_budgets
                wanted = [b for b in hf if b in served]
                if backend == "fp8":  # a single operating point: run it whatever the budgets
                    wanted = [8]
                for b in hf:
                    if b not in served and backend != "fp8":
                        skipped.append(Skipped(f"hf-{backend}", b, f"the backend serves only {served} bits"))
                runs += [RunSpec(method, float(b), backend) for b in wanted]
            continue
        for b in budgets:
            if method == "spectralkv" and calibration is None:
                skipped.append(Skipped(method, b, "no calibration given"))
            elif method == "spectralkv" and b < calibration.min_bits:
                skipped.append(Skipped(method, b, f"below the calibration's minimum {calibration.min_bits:.3f}"))
            elif method == "kivi" and float(b) != int(b):
                skipped.append(Skipped(method, b, "KIVI uses integer code widths"))
            else:
                runs.append(RunSpec(method, float(b)))
    return runs, skipped


def make_cache(
    method: str,
    model: Any,
    bits: float | None = None,
    calibration: Any = None,
    *,
    window: int = DEFAULT_WINDOW,
    sink_tokens: int = DEFAULT_SINK_TOKENS,
    backend: str | None = None,
    seed: int = 0,
    decode_cache: bool = False,
) -> Cache:
    """A fresh cache for ``method`` (see the module docstring for what ``bits`` means to each).

    ``decode_cache=True`` keeps a decoded copy of each compressed store next to it so a decode step does not
    re-decode the whole store (same numbers, faster evaluation; resident memory is then not what a deployment
    holds). It applies to ``spectralkv``, ``kivi`` and ``turboquant``.
    """
    if method == "fp16":
        cache: Cache = DynamicCache(config=getattr(model, "config", model))
        return cache
    if bits is None:
        raise ValueError(f"Method {method!r} needs `bits`.")
    if method == "spectralkv":
        if calibration is None:
            raise MethodUnavailable("spectralkv needs a calibration (SpectralKVConfig or a folder / Hub id).")
        from ..cache import SpectralKVCache

        cache = SpectralKVCache(model, calibration, bits=bits, window=window, sink_tokens=sink_tokens)
    elif method == "kivi":
        if float(bits) != int(bits):
            raise MethodUnavailable(f"KIVI uses integer code widths, got {bits!r}.")
        cache = kivi_cache(model, int(bits), sink_tokens=sink_tokens, window=window)
    elif method == "turboquant":
        cache = turboquant_cache(model, float(bits), seed=seed, sink_tokens=sink_tokens, window=window)
    elif method == "hf-quantized":
        if backend is None:
            candidates = [b for b in BACKENDS if bits in backend_bits(b) and not backend_unavailable(b)]
            if not candidates:
                raise MethodUnavailable(f"No installed QuantizedCache backend serves {bits!r} bits.")
            backend = candidates[0]
        reason = backend_unavailable(backend)
        if reason:
            raise MethodUnavailable(reason)
        return hf_quantized_cache(model, backend, int(bits))
    else:
        raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")
    if decode_cache:
        cache_decoded_stores(cache)
    return cache


def spec_cache_factory(spec: RunSpec, model: Any, calibration: Any = None, *, window: int = DEFAULT_WINDOW,
                       sink_tokens: int = DEFAULT_SINK_TOKENS, seed: int = 0, decode_cache: bool = True
                       ) -> Callable[[], Cache]:
    """A zero-argument factory of fresh caches for one run (checked once now, so errors surface early)."""

    def factory() -> Cache:
        return make_cache(spec.method, model, spec.bits, calibration, window=window, sink_tokens=sink_tokens,
                          backend=spec.backend, seed=seed, decode_cache=decode_cache)

    factory()
    return factory


# -- accounting ----------------------------------------------------------------------------------------------------
def bits_per_coordinate(cache: Cache, model: Any) -> float | None:
    """Bits per compressed coordinate of a used cache: codes + all metadata, averaged over compressed layers and
    K/V, as the stores account them. ``None`` for an uncompressed cache (or before any token was compressed)."""
    heads, head_dim = kv_geometry(model)
    total, count = 0.0, 0
    for layer in cache.layers:
        if isinstance(layer, CompressedLayer) and layer.is_initialized:
            total += layer.key_store.bits_per_token() + layer.value_store.bits_per_token()
            count += 2 * heads * head_dim
    if count:
        return total / count
    return hf_quantized_bits_per_coordinate(cache, model)


# -- decoded-copy wrapper (evaluation speed only) -------------------------------------------------------------------
def decode_tail(store: TokenStore, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The last ``n`` tokens of ``store`` decoded, without decoding the rest.

    Uses the store's own ``decode_tail`` (spectralkv, KIVI-style, TurboQuant-style); raises ``TypeError`` for a store
    without one."""
    tail = getattr(store, "decode_tail", None)
    if callable(tail):
        return tail(n, dtype)
    raise TypeError(f"{type(store).__name__} has no decode_tail")


class DecodeCachedStore(TokenStore):
    """Wraps a store and keeps its tokens decoded, so ``decode`` does not re-decode the whole store every step.

    Exact for stores that decode every token independently of tokens appended after it (spectralkv, KIVI-style,
    TurboQuant-style: checked in the tests): each appended chunk is decoded once, right after it is stored.
    ``memory`` and ``bits_per_token`` are the wrapped store's (the decoded copy is an evaluation-speed cache).
    """

    def __init__(self, factory: Callable[[], TokenStore]) -> None:
        self._factory = factory
        self.inner = factory()
        self.flush_multiple = self.inner.flush_multiple
        self.needs_positions = self.inner.needs_positions
        self.decoded = GrowableBuffer()  # [B, N, H, D] in the dtype of the appended tokens

    def append(self, x: torch.Tensor, **positions: Any) -> None:
        self.inner.append(x, **positions)
        try:
            new = decode_tail(self.inner, x.shape[2], x.dtype)
        except TypeError:  # no tail decoder: re-encode the chunk through a fresh store of the same kind
            probe = self._factory()
            probe.append(x, **positions)
            new = probe.decode(x.dtype)
        self.decoded.append(new.transpose(1, 2))

    def decode(self, dtype: torch.dtype) -> torch.Tensor | None:
        view = self.decoded.view()
        if view is None or view.shape[1] == 0:
            return None
        return view.transpose(1, 2).to(dtype)

    def __len__(self) -> int:
        return len(self.inner)

    def select_batch(self, index: torch.Tensor) -> None:
        self.inner.select_batch(index)
        self.decoded.select_batch(index)

    def memory(self) -> dict[str, int]:
        return self.inner.memory()

    def bits_per_token(self) -> float:
        return self.inner.bits_per_token()


def cache_decoded_stores(cache: Cache) -> Cache:
    """Make every not-yet-used ``CompressedLayer`` of ``cache`` wrap its stores in :class:`DecodeCachedStore`."""
    for layer in cache.layers:
        if isinstance(layer, CompressedLayer):
            if layer.is_initialized:
                raise ValueError("cache_decoded_stores needs a fresh cache (a layer already holds tokens).")
            k, v = layer._factories
            layer._factories = (lambda k=k: DecodeCachedStore(k), lambda v=v: DecodeCachedStore(v))
    return cache
