"""Turn a results dict (see :func:`spectralkv.evaluation.runner.run_evaluation`) into Markdown, JSON and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METHOD_ORDER = ("fp16", "spectralkv", "kivi", "turboquant", "hf-quantized")


def _family(run: dict[str, Any]) -> str:
    return f"hf-{run['backend']}" if run["method"] == "hf-quantized" else run["method"]


def _sort_key(run: dict[str, Any]) -> tuple[int, str, float]:
    m = run["method"]
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), _family(run), run.get("bits") or 0.0)


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def markdown_table(results: dict[str, Any]) -> str:
    """The results table (one row per run), followed by skipped runs and the settings."""
    runs = sorted(results["runs"], key=_sort_key)
    has = {task: any(task in r for r in runs) for task in ("perplexity", "needle", "fidelity")}
    head = ["method", "budget", "bits/coord"]
    if has["perplexity"]:
        head += ["PPL", "dPPL %", "95% CI (%)"]
    if has["needle"]:
        head += ["needle"]
    if has["fidelity"]:
        head += ["attn cos mean", "attn cos min (layer)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        row = [_family(r), "-" if r.get("bits") is None else f"{r['bits']:g}",
               "16 (ref)" if r["method"] == "fp16" else _fmt(r.get("bits_per_coordinate"), ".3f")]
        if has["perplexity"]:
            ppl = r.get("perplexity", {})
            ci = ppl.get("ci95_pct")
            row += [_fmt(ppl.get("ppl"), ".3f"), _fmt(ppl.get("dppl_pct"), "+.2f"),
                    "-" if ci is None or r["method"] == "fp16" else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"]
        if has["needle"]:
            nd = r.get("needle")
            row += ["n/a" if nd is None else f"{nd['correct']}/{nd['total']}"]
        if has["fidelity"]:
            fd = r.get("fidelity")
            row += ["n/a" if fd is None else _fmt(fd["mean"], ".4f"),
                    "n/a" if fd is None else f"{_fmt(fd['min'], '.4f')} ({fd['min_layer']})"]
        lines.append("| " + " | ".join(row) + " |")
    out = ["\n".join(lines)]
    if results.get("skipped"):
        out.append("Skipped: " + "; ".join(
            f"{s['method']}{'' if s['bits'] is None else '@' + format(s['bits'], 'g')}: {s['reason']}"
            for s in results["skipped"]))
    hf = results.get("hf_budgets", "all")
    if "hf-quantized" in results.get("methods", ()) and hf is not None and hf != "all":
        out.append("transformers' QuantizedCache hqq/quanto backends ran at "
                   f"{', '.join(format(b, 'g') for b in hf) or 'no'} bits only (`--hf-bits all` for every budget); "
                   "fp8 runs once at 8 bits.")
    s = results.get("settings", {})
    tasks = results.get("tasks", ())
    ppl = s.get("perplexity")
    if ppl and "perplexity" in tasks:
        out.append(
            f"Streaming perplexity: {ppl['windows']} windows x {ppl['decode']} scored decode steps after a "
            f"{ppl['prefill']}-token prefill; dPPL vs fp16 with a paired bootstrap 95% CI over windows. "
            f"Sinks {s.get('sink_tokens')}, recent window {s.get('window')} (same for every CompressedLayer method; "
            "hf-quantized uses transformers' own layout). bits/coord: codes + all metadata per compressed coordinate."
        )
    nd = s.get("needle")
    if nd and "needle" in tasks:
        out.append(f"Needle: {nd['context_tokens']}-token context, depths {list(nd['depths'])}, "
                   f"{nd['trials']} trial(s) per depth, greedy; correct/total.")
    return "\n\n".join(out) + "\n"


def write_json(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def pareto_plot(results: dict[str, Any], path: str | Path) -> Path | None:
    """dPPL (%) vs bits per coordinate, one line per method (with 95% CI bars). None when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    series: dict[str, list[tuple[float, float, float, float]]] = {}
    for r in results["runs"]:
        ppl = r.get("perplexity")
        if r["method"] == "fp16" or not ppl or r.get("bits_per_coordinate") is None or "dppl_pct" not in ppl:
            continue
        lo, hi = ppl["ci95_pct"]
        series.setdefault(_family(r), []).append((r["bits_per_coordinate"], ppl["dppl_pct"], lo, hi))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in sorted(series, key=lambda n: (METHOD_ORDER.index(n) if n in METHOD_ORDER else 99, n)):
        pts = sorted(series[name])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name, linewidth=2 if name == "spectralkv" else 1)
    ax.axhline(0, color="black", linewidth=0.8, linestyle="--", label="fp16")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.set_xlabel("bits per compressed coordinate (codes + metadata)")
    ax.set_ylabel("dPPL vs fp16 (%)")
    model = results.get("model", "")
    ax.set_title(f"Streaming perplexity: {model}" if model else "Streaming perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
