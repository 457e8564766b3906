"""Baselines the evaluation harness compares spectralkv with, one small module per method.

- :mod:`.kivi`: KIVI-style per-channel keys / per-token values, min-max integer codes (Liu et al., 2024).
- :mod:`.turboquant`: TurboQuant-style random rotation + Gaussian Lloyd-Max codes + fp16 norm (Zandieh et al., 2025).
- :mod:`.hf_quantized`: transformers' own ``QuantizedCache`` (fp8 / quanto / hqq backends, where installed).

KIVI and TurboQuant are :class:`~spectralkv.layer_base.TokenStore` s inside the same
:class:`~spectralkv.layer_base.CompressedLayer` as spectralkv (same sinks, window and flushing rule).
"""

from __future__ import annotations

from .common import compressed_cache, kv_geometry
from .hf_quantized import backend_unavailable, hf_quantized_bits_per_coordinate, hf_quantized_cache
from .kivi import KiviStore, kivi_cache
from .turboquant import TurboQuantStore, gaussian_lloyd_max, random_rotation, turboquant_cache

__all__ = [
    "KiviStore",
    "TurboQuantStore",
    "backend_unavailable",
    "compressed_cache",
    "gaussian_lloyd_max",
    "hf_quantized_bits_per_coordinate",
    "hf_quantized_cache",
    "kivi_cache",
    "kv_geometry",
    "random_rotation",
    "turboquant_cache",
]
