"""Host work per decode step: aten dispatches (all, and those that launch a kernel) of a tiny Llama, per cache.

Why: on a GPU an eager decode step of a 32-layer model is often limited by host-side launches, not by the kernels,
so every extra operation a cache adds per layer matters. Counted on CPU with a ``TorchDispatchMode``; each
``spectralkv::`` op is counted once (its own internals are not). "Launching" excludes views and allocations.

    TRITON_INTERPRET=1 python scripts/count_dispatches.py
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate  # noqa: E402  (the benchmark's tiny model and synthetic calibration)

NOT_LAUNCHING = {"empty", "empty_strided", "detach", "lift_fresh", "_local_scalar_dense"}


class Counter(TorchDispatchMode):
    """Counts dispatched aten ops; a ``spectralkv::`` op counts once, its internals not at all."""

    def __init__(self) -> None:
        super().__init__()
        self.total = self.launching = 0
        self._inside = False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if self._inside:
            return func(*args, **(kwargs or {}))
        self.total += 1
        self.launching += int(not func.is_view and func.overloadpacket.__name__ not in NOT_LAUNCHING)
        if func.namespace != "spectralkv":
            return func(*args, **(kwargs or {}))
        self._inside = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self._inside = False


def per_step(model: torch.nn.Module, cache: Any, impl: str, steps: int = 64) -> tuple[float, float]:
    model.set_attn_implementation(impl)
    ids = torch.randint(2, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tok = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        counter = Counter()
        with counter:
            for _ in range(steps):
                model(input_ids=tok, cache=cache, use_cache=True)
    return counter.total / steps, counter.launching / steps


def main(argv: list[str] | None = None) -> int:
    from transformers import DynamicCache

    from spectralkv.fused import FUSED_ATTENTION, FusedSpectralKVCache, register

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=64, help="decode steps averaged (default 64)")
    p.add_argument("--backend", choices=("torch", "triton"), default=None,
                   help="fused backend (default: triton under TRITON_INTERPRET=1, else torch, whose reference path "
                        "is many small ops, not one)")
    args = p.parse_args(argv)
    backend = args.backend or ("triton" if os.environ.get("TRITON_INTERPRET") == "1" else "torch")
    steps = args.steps
    model = bench_generate.build_model(bench_generate.parse_args(["--device", "cpu", "--tiny"]))
    cfg = bench_generate.synthetic_calibration(model, 2.5, window=8, sinks=2)
    layers = model.config.num_hidden_layers
    register()
    rows = [("`DynamicCache` + SDPA", per_step(model, DynamicCache(config=model.config), "sdpa", steps))]
    for fb in (1, 32):
        cache = FusedSpectralKVCache(model, cfg, window=8, sink_tokens=2, backend=backend, flush_block=fb)
        rows.append((f"fused ({backend}), `flush_block={fb}`", per_step(model, cache, FUSED_ATTENTION, steps)))
    base = rows[0][1]
    print(f"{layers} layers, batch 2, window 8, 2 sinks, {steps} decode steps averaged\n")
    print("| cache | dispatches per step | launching | launching over `DynamicCache`, per layer |")
    print("|---|---:|---:|---:|")
    for name, (total, launching) in rows:
        extra = "-" if name == rows[0][0] else f"{(launching - base[1]) / layers:+.2f}"
        print(f"| {name} | {total:.1f} | {launching:.1f} | {extra} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
