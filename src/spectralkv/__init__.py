"""spectralkv: KV-cache quantization in a calibrated spectral basis for Hugging Face transformers.

Importing the package is cheap and has no side effects; heavy pieces load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "SpectralKVConfig": "spectralkv.config",
    "SpectralKVCache": "spectralkv.cache",
    "attach": "spectralkv.hooks",
    "detach": "spectralkv.hooks",
    "attached": "spectralkv.hooks",
    "calibrate": "spectralkv.calibrate",
    "load_model": "spectralkv.models",
}

if TYPE_CHECKING:
    from .cache import SpectralKVCache
    from .calibrate import calibrate
    from .config import SpectralKVConfig
    from .hooks import attach, attached, detach
    from .models import load_model

__all__ = [
    "__version__",
    "SpectralKVConfig",
    "SpectralKVCache",
    "attach",
    "detach",
    "attached",
    "calibrate",
    "load_model",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spectralkv' has no attribute {name!r}")
