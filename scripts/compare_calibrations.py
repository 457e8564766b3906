#!/usr/bin/env python
"""Two calibrations of one model side by side: streaming perplexity paired on the same windows, at each budget.

The harness's confidence intervals are against fp16 and about as wide as the effect of one change to the method;
pairing the two calibrations on the same held-out windows resolves differences of a few tenths of a percent. For each
budget this reports both calibrations' dPPL vs fp16, the bits per coordinate each really stored, their mean key and
value code bits, and the paired difference (candidate - baseline) with its bootstrap 95% CI; then a table, JSON and a
plot of dPPL against budget.

    cp -r artifacts/smollm2-135m-instruct-skv /tmp/before   # e.g. the calibration before a change
    make run                                                 # the calibration after it
    .venv/bin/python scripts/compare_calibrations.py --baseline /tmp/before \\
        --candidate artifacts/smollm2-135m-instruct-skv --bits 2 2.5 3 4 --out docs/results/scale_format
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
    p.add_argument("--baseline", required=True, metavar="DIR", help="calibration compared against (folder or Hub id)")
    p.add_argument("--candidate", required=True, metavar="DIR", help="calibration under test (folder or Hub id)")
    p.add_argument("--labels", nargs=2, default=["baseline", "candidate"], metavar=("BASE", "CAND"),
                   help="names of the two in the report (default: %(default)s)")
    p.add_argument("--bits", type=float, nargs="+", default=[2.0, 2.5, 3.0, 4.0], help="budgets (default: %(default)s)")
    add_perplexity_arguments(p)
    p.add_argument("--out", type=Path, default=Path("bench_results/compare_calibrations"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.settings = perplexity_settings_from_args(p, args)
    return args


def describe(cfg: Any) -> dict[str, Any]:
    """The choices a calibration made, for the report."""
    return {"scale": cfg.scale_format if cfg.token_scale else "none", "key_weight": cfg.key_weight,
            "outlier_threshold": cfg.outlier_threshold, "outlier_fraction": cfg.outlier_fraction,
            "position_centring": cfg.position_centring, "default_bits": cfg.default_bits,
            "heldout_error": cfg.measured.get("chosen", {}).get("heldout_error")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from spectralkv import SpectralKVConfig
    from spectralkv.evaluation.methods import make_cache
    from spectralkv.evaluation.perplexity import evaluation_windows, streaming_nll, summarize
    from spectralkv.models import load_model
    from spectralkv.text import evaluation_tokens

    model, tokenizer = load_model()
    cfgs = {label: SpectralKVConfig.from_pretrained(path, model=model)
            for label, path in zip(args.labels, (args.baseline, args.candidate), strict=True)}
    usable = [b for b in args.bits if all(b >= c.min_bits for c in cfgs.values())]
    for b in sorted(set(args.bits) - set(usable)):
        print(f"{b:g} bits: below what a calibration's scales and outliers alone cost; left out", file=sys.stderr)
    if not usable:
        print("No budget both calibrations can serve.", file=sys.stderr)
        return 2
    settings = args.settings
    windows = evaluation_windows(evaluation_tokens(tokenizer), settings)
    factories: dict[str, Any] = {"fp16": lambda: make_cache("fp16", model)}
    for b in usable:
        for label, cfg in cfgs.items():
            factories[f"{label} {b:g}"] = lambda c=cfg, bb=b: make_cache("spectralkv", model, bb, c, decode_cache=True)
    res = streaming_nll(model, windows, factories, prefill=settings.prefill, batch_size=settings.batch_size,
                        progress=not args.no_progress)
    ref = res.nll["fp16"]
    base, cand = args.labels
    rows = []
    for b in usable:
        row: dict[str, Any] = {"bits": b}
        for label, cfg in cfgs.items():
            s = summarize(res.nll[f"{label} {b:g}"], ref, resamples=settings.bootstrap, seed=settings.seed)
            row[label] = {"dppl_pct": s["dppl_pct"], "ci95_pct": s["ci95_pct"],
                          "bits_per_coordinate": res.bits[f"{label} {b:g}"], **cfg.kv_split(b)}
        paired = summarize(res.nll[f"{cand} {b:g}"], res.nll[f"{base} {b:g}"], resamples=settings.bootstrap,
                           seed=settings.seed)
        row["paired_pct"], row["paired_ci95_pct"] = paired["dppl_pct"], paired["ci95_pct"]
        rows.append(row)
    meta = {"baseline": str(args.baseline), "candidate": str(args.candidate), "labels": args.labels,
            "choices": {label: describe(cfg) for label, cfg in cfgs.items()}, "settings": settings.to_dict(),
            "fp16_ppl": summarize(ref, None)["ppl"], "torch": torch.__version__,
            "argv": sys.argv[1:] if argv is None else argv}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = markdown(rows, meta)
    (args.out / "compare.md").write_text(md)
    plot(rows, meta, args.out / "compare.png")
    print(md)
    print(f"wrote {args.out}/compare.{{json,md,png}}", file=sys.stderr)
    return 0


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def ci(c: list[float]) -> str:
        return f"[{c[0]:+.2f}, {c[1]:+.2f}]"

    base, cand = meta["labels"]
    s = meta["settings"]
    lines = [
        f"### {cand} vs {base}",
        "",
        f"- {base}: `{meta['baseline']}`; {cand}: `{meta['candidate']}`",
        f"- Streaming perplexity: {s['windows']} windows, prefill {s['prefill']}, {s['decode']} decode steps each; "
        f"fp16 PPL {meta['fp16_ppl']:.3f}",
        f"- Command: `python scripts/compare_calibrations.py {' '.join(meta['argv'])}`",
        "",
        f"| budget | dPPL % {base} (bits/coord) | dPPL % {cand} (bits/coord) | {cand} - {base}, paired | K/V code bits "
        f"{base} | K/V code bits {cand} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        a, c = r[base], r[cand]
        lines.append(
            f"| {r['bits']:g} | {a['dppl_pct']:+.2f} {ci(a['ci95_pct'])} ({a['bits_per_coordinate']:.3f}) | "
            f"{c['dppl_pct']:+.2f} {ci(c['ci95_pct'])} ({c['bits_per_coordinate']:.3f}) | {r['paired_pct']:+.2f}% "
            f"{ci(r['paired_ci95_pct'])} | {a['key_bits']:.2f} / {a['value_bits']:.2f} | "
            f"{c['key_bits']:.2f} / {c['value_bits']:.2f} |")
    lines += ["", "Choices each calibration made (by held-out error at its default budget):", "",
              "| calibration | per-token scale | key weight | outliers | held-out error |", "|---|---|---:|---|---:|"]
    for label in (base, cand):
        d = meta["choices"][label]
        thr = "off" if d["outlier_threshold"] is None else (f"beyond {d['outlier_threshold']:g} std "
                                                            f"({100 * d['outlier_fraction']:.2f}%)")
        err = "-" if d["heldout_error"] is None else f"{d['heldout_error']:.3e}"
        lines.append(f"| {label} | {d['scale']} | {d['key_weight']:g} | {thr} | {err} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    """dPPL vs fp16 against the budget for both calibrations, with their 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, label in enumerate(meta["labels"]):
        x = [r["bits"] + (i - 0.5) * 0.04 for r in rows]  # side by side, so the intervals do not hide each other
        y = [r[label]["dppl_pct"] for r in rows]
        err = [[yy - r[label]["ci95_pct"][0] for yy, r in zip(y, rows, strict=True)],
               [r[label]["ci95_pct"][1] - yy for yy, r in zip(y, rows, strict=True)]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    ax.axhline(0, color="grey", lw=1)
    ax.set_xlabel("budget (bits per coordinate, all metadata included)")
    ax.set_ylabel("perplexity vs fp16 cache (%)")
    ax.set_title(f"Streaming perplexity, {meta['settings']['windows']} windows (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
