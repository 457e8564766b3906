"""Streaming perplexity: prefill, then teacher-forced decode over the compressed cache, scoring every decode step.

For each window of held-out text (``prefill + decode + 1`` tokens): the first ``prefill`` tokens go into the cache
in one exact forward (shared between methods, see :mod:`.replay`), then ``decode`` tokens are fed one at a time,
each step attending to the method's cache, and the NLL of the next token is recorded. Only decode steps are
scored: the prefill's own predictions never see a compressed token. Windows are batched along the batch dimension.

Statistics: perplexity ``exp(mean NLL)`` over all scored tokens; ``dPPL = PPL / PPL_ref - 1``; its 95% confidence
interval from a paired bootstrap over windows (each resample draws the same windows for the method and the
reference, so text difficulty cancels out).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from ..compat import cache_kwarg
from ..text import windows as split_windows
from .methods import bits_per_coordinate
from .replay import capture_prefill, replay_prefill


@dataclass
class PerplexitySettings:
    """Streaming-perplexity settings.

    Args:
        prefill: tokens prefilled exactly per window (the part that gets compressed, minus sinks and window).
        decode: teacher-forced decode steps scored per window.
        windows: number of held-out windows.
        batch_size: windows run together along the batch dimension.
        bootstrap: bootstrap resamples for the confidence interval.
        seed: seed of the bootstrap.
    """

    prefill: int = 512
    decode: int = 192
    windows: int = 24
    batch_size: int = 24
    bootstrap: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prefill", "decode", "windows", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.bootstrap < 0:
            raise ValueError(f"`bootstrap` must be >= 0, got {self.bootstrap}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluation_windows(ids: torch.Tensor, settings: PerplexitySettings) -> torch.Tensor:
    """``[windows, prefill + decode + 1]`` consecutive non-overlapping windows of ``ids``."""
    length = settings.prefill + settings.decode + 1
    rows = split_windows(ids, length, settings.windows)
    if len(rows) < settings.windows:
        raise ValueError(
            f"The evaluation text has {len(ids)} tokens: room for {len(rows)} windows of {length}, but "
            f"{settings.windows} were requested. Lower --windows, --prefill or --decode, or use a longer text."
        )
    return torch.stack(rows)


@dataclass
class StreamingResult:
    """Per run label: NLL ``[windows, decode]``, measured bits per compressed coordinate, seconds spent, and
    whether its prefill was shared (replayed) or run for it."""

    nll: dict[str, torch.Tensor]
    bits: dict[str, float | None]
    seconds: dict[str, float]
    replayed: dict[str, bool]
    prefill_seconds: float


def streaming_nll(
    model: Any,
    windows: torch.Tensor,
    factories: Mapping[str, Callable[[], Cache]],
    *,
    prefill: int,
    batch_size: int,
    progress: bool = True,
) -> StreamingResult:
    """Teacher-forced decode NLL of every window under every cache factory (see the module docstring)."""
    if windows.shape[1] < prefill + 2:
        raise ValueError(f"windows of {windows.shape[1]} tokens leave nothing to decode after {prefill}.")
    device = next(model.parameters()).device
    steps = windows.shape[1] - prefill - 1
    nll = {name: torch.empty(windows.shape[0], steps) for name in factories}
    bits: dict[str, float | None] = dict.fromkeys(factories)
    seconds = dict.fromkeys(factories, 0.0)
    replayed = dict.fromkeys(factories, True)
    prefill_seconds = 0.0
    batches = range(0, windows.shape[0], batch_size)
    bar = tqdm(total=len(batches) * len(factories) * steps, desc="perplexity", unit="step", disable=not progress)
    key = cache_kwarg(model)
    with torch.inference_mode():
        for start in batches:
            x = windows[start : start + batch_size].to(device)
            t0 = time.perf_counter()
            captured = capture_prefill(model, x[:, :prefill])
            prefill_seconds += time.perf_counter() - t0
            for name, factory in factories.items():
                bar.set_postfix_str(name)
                t0 = time.perf_counter()
                cache, ok = replay_prefill(model, factory, captured)
                replayed[name] &= ok
                for t in range(steps):
                    pos = prefill + t
                    out = model(input_ids=x[:, pos : pos + 1], **{key: cache}, use_cache=True)
                    logits = out.logits[:, -1].float()
                    nll[name][start : start + x.shape[0], t] = torch.nn.functional.cross_entropy(
                        logits, x[:, pos + 1], reduction="none"
                    ).cpu()
                    bar.update()
                bits[name] = bits_per_coordinate(cache, model)
                seconds[name] += time.perf_counter() - t0
                del cache
            del captured
    bar.close()
    return StreamingResult(nll, bits, seconds, replayed, prefill_seconds)


def paired_bootstrap_ci(nll: torch.Tensor, ref: torch.Tensor, *, resamples: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of dPPL (in %) of ``nll`` vs ``ref`` (both ``[windows, tokens]``), paired over windows."""
    a, b = nll.double().mean(1), ref.double().mean(1)
    if resamples == 0 or a.numel() < 2:
        d = float((a - b).mean())
        return (math.expm1(d) * 100, math.expm1(d) * 100)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, a.numel(), (resamples, a.numel()), generator=g)
    diff = (a[idx] - b[idx]).mean(1)
    lo, hi = torch.quantile(diff, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return math.expm1(lo) * 100, math.expm1(hi) * 100


def summarize(nll: torch.Tensor, ref: torch.Tensor | None, *, resamples: int = 2000, seed: int = 0
              ) -> dict[str, Any]:
    """Perplexity, dPPL vs ``ref`` in % and its paired-bootstrap 95% CI, plus per-window mean NLL."""
    mean = float(nll.double().mean())
    out: dict[str, Any] = {
        "ppl": math.exp(mean),
        "nll": mean,
        "windows": int(nll.shape[0]),
        "scored_tokens": int(nll.numel()),
        "per_window_nll": [float(x) for x in nll.double().mean(1)],
    }
    if ref is not None:
        d = mean - float(ref.double().mean())
        out["dppl_pct"] = math.expm1(d) * 100
        out["ci95_pct"] = list(paired_bootstrap_ci(nll, ref, resamples=resamples, seed=seed))
    return out
