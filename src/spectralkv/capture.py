"""Observe post-RoPE queries, keys and values of every attention layer during a forward pass.

We register a pass-through attention function with transformers' ``AttentionInterface`` and switch the model to it
for the duration of a ``with`` block: the function sees exactly the tensors the model's attention sees (keys and
values exactly as the cache would store them), hands them to a callback, then runs the model's original attention.
No model code is patched and the original implementation is restored on exit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

CAPTURE_IMPL = "spectralkv_capture"
Callback = Callable[[int, torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], None]

_state: dict[str, Any] = {"callback": None, "delegate": "sdpa"}


def _delegate_fn(module: torch.nn.Module, name: str) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward to delegate to.")
        return fn
    return ALL_ATTENTION_FUNCTIONS[name]


def _capture_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
    cb = _state["callback"]
    if cb is not None:
        cb(int(module.layer_idx), module, query, key, value)
    return _delegate_fn(module, _state["delegate"])(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(CAPTURE_IMPL, _capture_attention)
    # Without a mask function registered under the same name, padded batches would reach us with mask=None.
    AttentionMaskInterface.register(CAPTURE_IMPL, sdpa_mask if _state["delegate"] != "eager" else eager_mask)


@contextmanager
def capture_attention(model: torch.nn.Module, callback: Callback) -> Iterator[None]:
    """Within the block, every attention call of ``model`` reports ``(layer_idx, module, q, k, v)`` to ``callback``."""
    original = model.config._attn_implementation
    _state["delegate"] = "eager" if original == "eager" else "sdpa"
    _state["callback"] = callback
    _register()
    model.set_attn_implementation(CAPTURE_IMPL)
    try:
        yield
    finally:
        _state["callback"] = None
        model.set_attn_implementation(original)
