#!/usr/bin/env python
"""How many exact-outlier slots per token the static cache needs: streaming perplexity against memory.

``StaticSpectralKVCache`` keeps a calibration's exact outliers in ``C`` fixed slots per token, layer and side, and
pays for every slot. With ``C`` at the calibration's per-token cap it keeps exactly what the growing caches keep;
fewer slots save memory, each token then keeping its largest outliers. This script measures what fewer slots cost,
in the harness's streaming setting (exact prefill, then teacher-forced decode steps over the compressed cache), on
the embedded SmolLM2-135M-Instruct with the default calibration, against fp16 and against the calibration without
outliers (``cfg.without_outliers()``: their bits go to the codes).

Keeping the ``C`` largest outliers above the threshold is what the quantizer's per-token cap does (the slot finder
and the cap pick the same entries: ``tests/test_outliers.py::test_slot_outliers_are_the_csr_outliers``, the cap
binding there), so each ``C`` runs as the growing ``SpectralKVCache`` with its quantizers' cap set to ``C`` (fast:
decoded stores are cached), and the memory column is the static layout's: codes, scales, one count and ``C`` slots
(index + fp16 value) per token, layer and side, in bits per compressed coordinate.

    make run   # once: the default calibration, saved in artifacts/smollm2-135m-instruct-skv
    .venv/bin/python scripts/eval_outlier_slots.py --calibration artifacts/smollm2-135m-instruct-skv \\
        --bits 2 2.5 3 4 --slots 1 2 --out docs/results/outlier_slots
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from spectralkv.evaluation.cli import add_perplexity_arguments, perplexity_settings_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibration", required=True, metavar="DIR",
                   help="a spectralkv calibration of the model (made with `spectralkv demo --out DIR` or "
                        "`spectralkv calibrate`)")
    p.add_argument("--bits", type=float, nargs="+", default=[3.0], help="budgets (default: %(default)s)")
    p.add_argument("--slots", type=int, nargs="+", default=[1, 2], help="slot counts besides the cap and the "
                   "static cache's default (default: %(default)s)")
    add_perplexity_arguments(p)
    p.add_argument("--out", type=Path, default=Path("bench_results/outlier_slots"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.settings = perplexity_settings_from_args(p, args)
    if any(s < 1 for s in args.slots):
        p.error(f"--slots must be >= 1, got {args.slots}")
    return args


def static_bits_per_coordinate(cfg: Any, bits: float, slots: int) -> float:
    """Bits per compressed coordinate the static layout stores at ``slots`` (0: no outliers): codes and scales as
    allocated, plus per token, layer and side one count and ``slots`` x (index + fp16 value)."""
    from spectralkv.quantizer import outlier_count_bits, outlier_entry_bits

    coords = cfg.num_kv_heads * cfg.head_dim
    total = sum(q.code_bits_per_token for q in cfg.quantizers(bits).values())
    sides = len(cfg.quantizers(bits))
    total += sides * (cfg.num_kv_heads * 16 if cfg.token_scale else 0)
    if slots:
        total += sides * (outlier_count_bits(coords) + slots * outlier_entry_bits(coords))
    return total / (sides * coords)


def capped_factory(model: Any, cfg: Any, bits: float, cap: int | None) -> Any:
    """Fresh growing caches (decoded stores cached) whose quantizers keep at most ``cap`` outliers per token (None:
    the calibration's cap)."""
    from spectralkv.cache import SpectralKVCache
    from spectralkv.evaluation.methods import cache_decoded_stores

    class CappedCache(SpectralKVCache):
        def _compressed_layer(self, qk: Any, qv: Any) -> Any:
            if cap is not None:
                qk.outlier_cap = qv.outlier_cap = cap
            return super()._compressed_layer(qk, qv)

    def factory() -> Any:
        return cache_decoded_stores(CappedCache(model, cfg, bits=bits))

    factory()  # errors surface now
    return factory


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from spectralkv import SpectralKVConfig
    from spectralkv.evaluation.methods import make_cache
    from spectralkv.evaluation.perplexity import evaluation_windows, streaming_nll, summarize
    from spectralkv.models import load_model
    from spectralkv.static import default_outlier_slots
    from spectralkv.text import evaluation_tokens

    model, tokenizer = load_model()
    cfg = SpectralKVConfig.from_pretrained(args.calibration, model=model)
    if cfg.outlier_threshold is None or cfg.outlier_cap is None:
        print(f"{args.calibration} keeps no exact outliers: nothing to measure.", file=sys.stderr)
        return 2
    cap = cfg.outlier_cap
    slot_counts = sorted({s for s in [*args.slots, default_outlier_slots(cfg)] if s < cap})
    settings = args.settings
    windows = evaluation_windows(evaluation_tokens(tokenizer), settings)
    factories: dict[str, Any] = {"fp16": lambda: make_cache("fp16", model)}
    labels: dict[str, tuple[float, int]] = {}
    default = default_outlier_slots(cfg)
    for b in args.bits:
        for slots in [cap, *slot_counts]:
            label = (f"{b:g} bit, {slots} slot{'s' * (slots != 1)}" + (" (cap)" if slots == cap else "")
                     + (" (static default)" if slots == default else ""))
            factories[label] = capped_factory(model, cfg, b, None if slots == cap else slots)
            labels[label] = (b, slots)
        plain = cfg.without_outliers()
        label = f"{b:g} bit, no outliers"
        factories[label] = (lambda c=plain, bb=b: make_cache("spectralkv", model, bb, c, decode_cache=True))
        labels[label] = (b, 0)
    res = streaming_nll(model, windows, factories, prefill=settings.prefill, batch_size=settings.batch_size,
                        progress=not args.no_progress)
    ref = res.nll["fp16"]
    rows = []
    for label, (b, slots) in labels.items():
        s = summarize(res.nll[label], ref, resamples=settings.bootstrap, seed=settings.seed)
        source = plain_or(cfg, slots)
        rows.append({"label": label, "bits": b, "slots": slots, "ppl": s["ppl"], "dppl_pct": s["dppl_pct"],
                     "ci95_pct": s["ci95_pct"], "measured_bits": res.bits[label],
                     "static_bits": static_bits_per_coordinate(source, b, slots), "seconds": res.seconds[label]})
    fp16 = summarize(ref, None)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"calibration": str(args.calibration), "outlier_threshold": cfg.outlier_threshold, "cap": cap,
            "outlier_fraction": cfg.outlier_fraction, "settings": settings.to_dict(), "fp16_ppl": fp16["ppl"],
            "torch": torch.__version__, "argv": sys.argv[1:] if argv is None else argv}
    (args.out / "outlier_slots.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = markdown(rows, meta)
    (args.out / "outlier_slots.md").write_text(md)
    plot(rows, args.out / "outlier_slots.png")
    print(md)
    print(f"wrote {args.out}/outlier_slots.{{json,md,png}}", file=sys.stderr)
    return 0


def plain_or(cfg: Any, slots: int) -> Any:
    """The calibration the static layout is accounted with: without outliers for 0 slots (its own allocation)."""
    return cfg.without_outliers() if slots == 0 else cfg


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "### Exact-outlier slots in the static cache",
        "",
        f"- Calibration: `{meta['calibration']}` (threshold {meta['outlier_threshold']:g} std, "
        f"{100 * meta['outlier_fraction']:.2f}% of coordinates, cap {meta['cap']} per token)",
        f"- Streaming perplexity: {meta['settings']['windows']} windows, prefill {meta['settings']['prefill']}, "
        f"{meta['settings']['decode']} decode steps each; fp16 PPL {meta['fp16_ppl']:.3f}",
        f"- Command: `python scripts/eval_outlier_slots.py {' '.join(meta['argv'])}`",
        "",
        "| run | dPPL % | 95% CI (%) | bits/coord held (growing, measured) | bits/coord static layout |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lo, hi = r["ci95_pct"]
        held = "-" if r["measured_bits"] is None else f"{r['measured_bits']:.3f}"
        lines.append(f"| {r['label']} | {r['dppl_pct']:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {held} | "
                     f"{r['static_bits']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    cap = max(r["slots"] for r in rows)
    for slots in sorted({r["slots"] for r in rows}):
        pts = sorted((r["static_bits"], r["dppl_pct"], r["bits"]) for r in rows if r["slots"] == slots)
        name = ("no outliers" if slots == 0 else f"{slots} slot{'s' * (slots != 1)}"
                + (" (the cap: what the growing caches keep)" if slots == cap else ""))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        for x, y, b in pts:
            ax.annotate(f"{b:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("bits per coordinate stored by the static cache")
    ax.set_ylabel("perplexity increase vs fp16 (%)")
    ax.set_title("Static cache: exact-outlier slots vs quality (labels: budget)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
