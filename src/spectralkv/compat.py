"""Version shims for the transformers API we touch.

transformers 5.24 renamed the forward argument and output field ``past_key_values`` to ``cache`` (the old name
still works with a deprecation warning, but a hook that sets the old name while ``generate`` passes the new one
makes the model ignore our cache). Everything that passes or reads a cache goes through these two helpers.
"""

from __future__ import annotations

import inspect
from typing import Any

CACHE_NAMES = ("cache", "past_key_values")


def cache_kwarg(model: Any) -> str:
    """The keyword ``model.forward`` takes its KV cache under: ``"cache"`` (transformers >= 5.24) or
    ``"past_key_values"``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output: Any) -> Any:
    """The cache a forward or ``generate`` returned, under whichever name this transformers version uses."""
    fields = getattr(output, "__dataclass_fields__", None) or {}
    for name in CACHE_NAMES:
        if name in fields:
            return getattr(output, name)
    return None
