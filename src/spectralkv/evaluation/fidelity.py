"""Attention fidelity: per-layer cosine similarity of attention outputs with compressed vs exact keys/values.

A diagnostic, layer by layer: the real queries, keys and values of held-out text are captured from one exact
forward; each method's cache is filled with the first ``prefill`` tokens, then for each later position the
position's own key/value is written through ``cache.update`` (what the attention layer would do) and the real query
attends to whatever the cache returns. The output (after ``o_proj``) is compared with exact causal attention by
cosine similarity. Queries are always the model's queries, never the keys. Errors do not compound across layers
here (every layer sees exact inputs); the end-to-end effect is what streaming perplexity measures.
Sliding-window layers are skipped; logit soft-capping is not applied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from .replay import capture_prefill, replay_prefill


@dataclass
class FidelitySettings:
    """Attention-fidelity settings.

    Args:
        windows: held-out windows.
        prefill: tokens in the cache before the first measured position.
        decode: measured positions per window (each one written to the cache, then attended from).
        batch_size: windows run together.
    """

    windows: int = 4
    prefill: int = 512
    decode: int = 32
    batch_size: int = 4

    def __post_init__(self) -> None:
        for name in ("windows", "prefill", "decode", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _output(module: torch.nn.Module, o: torch.Tensor) -> torch.Tensor:
    """``[B, Hq, T, D]`` attention output -> ``[B, T, hidden]`` after ``o_proj`` (raw heads when there is none)."""
    o = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)
    proj = getattr(module, "o_proj", None)
    return o if proj is None else proj(o)


def _attend(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    scale = float(getattr(module, "scaling", q.shape[-1] ** -0.5))
    o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=causal, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return _output(module, o)


def attention_fidelity(
    model: Any,
    windows: torch.Tensor,
    factories: Mapping[str, Callable[[], Cache]],
    settings: FidelitySettings,
    *,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Per label: ``{"per_layer": [mean cosine per layer or None], "mean": ..., "min": ..., "min_layer": ...}``."""
    p, m = settings.prefill, settings.decode
    if windows.shape[1] < p + m:
        raise ValueError(f"windows of {windows.shape[1]} tokens are shorter than prefill + decode = {p + m}.")
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    count = 0
    batches = range(0, windows.shape[0], settings.batch_size)
    bar = tqdm(total=len(batches) * len(factories), desc="attention fidelity", unit="run", disable=not progress)
    skip: set[int] = set()
    with torch.inference_mode():
        for start in batches:
            x = windows[start : start + settings.batch_size, : p + m].to(device)
            cap = capture_prefill(model, x, queries=True)
            assert cap.queries is not None
            n_layers = len(cap.keys)
            ref = [
                _attend(cap.modules[l], cap.queries[l], cap.keys[l], cap.values[l], causal=True)[:, p:].float()
                for l in range(n_layers)
            ]
            for name, factory in factories.items():
                bar.set_postfix_str(name)
                cache, _ = replay_prefill(model, factory, cap, length=p)
                skip |= {l for l in range(n_layers) if getattr(cache.layers[l], "is_sliding", False)}
                acc = sums.setdefault(name, torch.zeros(n_layers, dtype=torch.float64))
                for t in range(p, p + m):
                    for l in range(n_layers):
                        k, v = cache.update(cap.keys[l][:, :, t : t + 1], cap.values[l][:, :, t : t + 1], l)
                        if l in skip:
                            continue
                        out = _attend(cap.modules[l], cap.queries[l][:, :, t : t + 1], k, v, causal=False).float()
                        acc[l] += F.cosine_similarity(out[:, 0], ref[l][:, t - p], dim=-1).double().sum()
                bar.update()
                del cache
            count += x.shape[0] * m
            del cap, ref
    bar.close()
    results = {}
    for name, acc in sums.items():
        per_layer = [None if l in skip else float(acc[l] / count) for l in range(len(acc))]
        valid = [(c, l) for l, c in enumerate(per_layer) if c is not None]
        worst = min(valid) if valid else (None, None)
        results[name] = {
            "per_layer": per_layer,
            "mean": sum(c for c, _ in valid) / len(valid) if valid else None,
            "min": worst[0],
            "min_layer": worst[1],
        }
    return results
