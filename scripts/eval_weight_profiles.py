#!/usr/bin/env python
"""What re-fitting the per-layer K/V weights at each budget buys: streaming perplexity with and without profiles.

A calibration chooses its per-layer key and value weights (and the key weight) by held-out error at its default
budget; ``calibrate(profile_budgets=...)`` re-fits them at other budgets and keeps each where it lowers the held-out
error there. This script measures what that does to quality in the harness's streaming setting (exact prefill, then
teacher-forced decode steps over the compressed cache) on the embedded SmolLM2-135M-Instruct: at each budget the
calibration as served (its profile) against the same calibration with one set of weights
(``cfg.with_weight_profiles([])``), both against fp16, plus the paired difference between the two.

    make run   # once: the default calibration, saved in artifacts/smollm2-135m-instruct-skv
    .venv/bin/python scripts/eval_weight_profiles.py --calibration artifacts/smollm2-135m-instruct-skv \\
        --bits 2 2.5 4 --out docs/results/weight_profiles
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
    p.add_argument("--calibration", required=True, metavar="DIR", help="a spectralkv calibration of the model")
    p.add_argument("--bits", type=float, nargs="+", default=[2.0, 2.5, 4.0], help="budgets (default: %(default)s)")
    add_perplexity_arguments(p)
    p.add_argument("--out", type=Path, default=Path("bench_results/weight_profiles"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.settings = perplexity_settings_from_args(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from spectralkv import SpectralKVConfig
    from spectralkv.evaluation.methods import make_cache
    from spectralkv.evaluation.perplexity import evaluation_windows, streaming_nll, summarize
    from spectralkv.models import load_model
    from spectralkv.text import evaluation_tokens

    model, tokenizer = load_model()
    cfg = SpectralKVConfig.from_pretrained(args.calibration, model=model)
    plain = cfg.with_weight_profiles([])
    settings = args.settings
    windows = evaluation_windows(evaluation_tokens(tokenizer), settings)
    factories: dict[str, Any] = {"fp16": lambda: make_cache("fp16", model)}
    budgets = []
    for b in args.bits:
        served = cfg.profile_bits(b)
        if served == cfg.default_bits:
            print(f"{b:g} bits: served with the default weights ({cfg.default_bits:g}); nothing to compare",
                  file=sys.stderr)
            continue
        budgets.append((b, served))
        factories[f"{b:g} profile"] = lambda c=cfg, bb=b: make_cache("spectralkv", model, bb, c, decode_cache=True)
        factories[f"{b:g} default weights"] = (lambda c=plain, bb=b: make_cache("spectralkv", model, bb, c,
                                                                              decode_cache=True))
    if not budgets:
        print("No budget asked for is served by a weight profile of this calibration.", file=sys.stderr)
        return 2
    res = streaming_nll(model, windows, factories, prefill=settings.prefill, batch_size=settings.batch_size,
                        progress=not args.no_progress)
    ref = res.nll["fp16"]
    rows = []
    for b, served in budgets:
        prof, base = res.nll[f"{b:g} profile"], res.nll[f"{b:g} default weights"]
        sp, sb = (summarize(x, ref, resamples=settings.bootstrap, seed=settings.seed) for x in (prof, base))
        paired = summarize(prof, base, resamples=settings.bootstrap, seed=settings.seed)
        rows.append({"bits": b, "profile_bits": served,
                     "profile": {"dppl_pct": sp["dppl_pct"], "ci95_pct": sp["ci95_pct"],
                                 "bits_per_coordinate": res.bits[f"{b:g} profile"], **cfg.kv_split(b)},
                     "default_weights": {"dppl_pct": sb["dppl_pct"], "ci95_pct": sb["ci95_pct"],
                                         "bits_per_coordinate": res.bits[f"{b:g} default weights"],
                                         **plain.kv_split(b)},
                     "profile_vs_default_pct": paired["dppl_pct"], "profile_vs_default_ci95_pct": paired["ci95_pct"]})
    meta = {"calibration": str(args.calibration), "default_bits": cfg.default_bits,
            "profiles": [p["bits"] for p in cfg.weight_profiles], "settings": settings.to_dict(),
            "fp16_ppl": summarize(ref, None)["ppl"], "torch": torch.__version__,
            "calibration_rows": cfg.measured.get("budget_profiles", []),
            "argv": sys.argv[1:] if argv is None else argv}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "weight_profiles.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = markdown(rows, meta)
    (args.out / "weight_profiles.md").write_text(md)
    print(md)
    print(f"wrote {args.out}/weight_profiles.{{json,md}}", file=sys.stderr)
    return 0


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def ci(c: list[float]) -> str:
        return f"[{c[0]:+.2f}, {c[1]:+.2f}]"

    lines = [
        "### Per-budget weight profiles",
        "",
        f"- Calibration: `{meta['calibration']}` (default budget {meta['default_bits']:g}; profiles kept at "
        f"{', '.join(f'{b:g}' for b in meta['profiles']) or 'none'})",
        f"- Streaming perplexity: {meta['settings']['windows']} windows, prefill {meta['settings']['prefill']}, "
        f"{meta['settings']['decode']} decode steps each; fp16 PPL {meta['fp16_ppl']:.3f}",
        f"- Command: `python scripts/eval_weight_profiles.py {' '.join(meta['argv'])}`",
        "",
        "| budget | dPPL %, default weights | dPPL %, profile | profile vs default weights (paired) | K/V code bits, "
        "default | K/V code bits, profile |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d, p = r["default_weights"], r["profile"]
        lines.append(
            f"| {r['bits']:g} (profile {r['profile_bits']:g}) | {d['dppl_pct']:+.2f} {ci(d['ci95_pct'])} | "
            f"{p['dppl_pct']:+.2f} {ci(p['ci95_pct'])} | {r['profile_vs_default_pct']:+.2f}% "
            f"{ci(r['profile_vs_default_ci95_pct'])} | {d['key_bits']:.2f} / {d['value_bits']:.2f} | "
            f"{p['key_bits']:.2f} / {p['value_bits']:.2f} |")
    lines += ["", "What the calibration measured (held-out weighted attention-output error at each budget; a "
              "profile is kept where re-fitting lowers it):", "",
              "| budget | default weights | re-fitted | kept |", "|---|---:|---:|---|"]
    for r in meta["calibration_rows"]:
        if "skipped" in r:
            lines.append(f"| {r['bits']:g} | - | - | no: {r['skipped']} |")
        else:
            lines.append(f"| {r['bits']:g} | {r['heldout_error_default_weights']:.3e} | "
                         f"{r['heldout_error_profile']:.3e} | {'yes' if r['kept'] else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
