#!/usr/bin/env python
"""Key and value error by position, for calibrations side by side: what RoPE-aware centring changes.

A calibration centres keys on their post-RoPE mean (``position_centring=None``) or on the pre-RoPE mean rotated to
each key's position (``"rope"``, see :mod:`spectralkv.positions`). This script runs one long window of held-out
evaluation text through the model, captures every compressed layer's keys and values (post-RoPE, as the cache gets
them), and round-trips them through each calibration's quantizers (``fake_quantize``, equal to encode + decode) at
each budget. It reports the relative error ``sqrt(sum |x_hat - x|^2 / sum |x|^2)`` over all compressed layers and
heads per position range (the calibration's sequences are 2048 tokens by default, so later ranges are positions it
never saw), writes a table and a plot of the key error against position.

    .venv/bin/spectralkv calibrate --out artifacts/smollm2-135m-instruct-skv
    .venv/bin/spectralkv calibrate --position-centring rope --out artifacts/smollm2-135m-instruct-skv-rope
    .venv/bin/python scripts/eval_position_centring.py --calibrations artifacts/smollm2-135m-instruct-skv \\
        artifacts/smollm2-135m-instruct-skv-rope --bits 2 3 4 --out docs/results/position_centring
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

SINKS = 4  # leading tokens the cache keeps exact (not scored)
BIN = 128  # tokens per point of the plot


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """``"4-2048,2048-4096"`` -> ``[(4, 2048), (2048, 4096)]`` (half-open, increasing, non-empty)."""
    out = []
    for part in text.split(","):
        try:
            lo, hi = (int(x) for x in part.split("-"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"position range {part!r} is not START-STOP") from None
        if not 0 <= lo < hi:
            raise argparse.ArgumentTypeError(f"position range {part!r} must have 0 <= START < STOP")
        out.append((lo, hi))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibrations", nargs="+", required=True, metavar="DIR",
                   help="calibrations of the model to compare (folders or Hub ids)")
    p.add_argument("--bits", type=float, nargs="+", default=[2.0, 3.0, 4.0], help="budgets (default: %(default)s)")
    p.add_argument("--length", type=int, default=4352, help="tokens in the evaluation window (default: %(default)s)")
    p.add_argument("--ranges", type=parse_ranges, default=parse_ranges("4-2048,2048-4096,4096-4352"),
                   help="position ranges to report (default: 4-2048,2048-4096,4096-4352)")
    p.add_argument("--out", type=Path, default=Path("bench_results/position_centring"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.length <= SINKS:
        p.error(f"--length must exceed the {SINKS} sink tokens, got {args.length}")
    if any(hi > args.length for _, hi in args.ranges):
        p.error(f"--ranges must lie within --length {args.length}")
    if len({label(c) for c in args.calibrations}) != len(args.calibrations):
        p.error("--calibrations must have distinct names")
    return args


def label(path: str) -> str:
    return Path(str(path)).name or str(path)


def capture(model: Any, ids: torch.Tensor, layers: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (keys, values)}`` ``[1, H, T, D]`` float32 as the cache receives them."""
    from spectralkv.capture import capture_attention

    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    wanted = set(layers)

    def cb(layer: int, module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if layer in wanted:
            out[layer] = (k.detach().float().cpu().clone(), v.detach().float().cpu().clone())

    with torch.inference_mode(), capture_attention(model, cb):
        model(input_ids=ids.view(1, -1), use_cache=False)
    return out


def squared_errors(cfg: Any, bits: float, kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per kind, ``(sum of squared errors, sum of squared norms)`` per position ``[T]`` over layers and heads."""
    quant = cfg.quantizers(bits)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, kind in enumerate(("k", "v")):
        err = norm = None
        for layer, pair in kv.items():
            x = pair[i]
            positions = torch.arange(x.shape[2])
            xh = quant[(layer, kind)].fake_quantize(x, positions=positions)
            e, n = (xh - x).pow(2).sum((0, 1, 3)).double(), x.pow(2).sum((0, 1, 3)).double()
            err, norm = (e, n) if err is None else (err + e, norm + n)
        out[kind] = (err, norm)
    return out


def relative(err: torch.Tensor, norm: torch.Tensor, lo: int, hi: int) -> float:
    return float((err[lo:hi].sum() / norm[lo:hi].sum().clamp_min(1e-30)).sqrt())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from spectralkv import SpectralKVConfig
    from spectralkv.models import load_model
    from spectralkv.text import evaluation_tokens, windows

    model, tokenizer = load_model()
    cfgs = {label(c): SpectralKVConfig.from_pretrained(c, model=model) for c in args.calibrations}
    ids = evaluation_tokens(tokenizer)
    if len(ids) < args.length:
        print(f"the evaluation text has {len(ids)} tokens, fewer than --length {args.length}", file=sys.stderr)
        return 2
    window = windows(ids, args.length, 1)[0]
    layers = sorted({layer for cfg in cfgs.values() for layer in cfg.compressed_layers})
    kv = capture(model, window, layers)
    rows, curves = [], {}
    jobs = [(name, b) for name in cfgs for b in args.bits]
    for name, b in tqdm(jobs, desc="round trips", disable=args.no_progress):
        cfg = cfgs[name]
        sq = squared_errors(cfg, b, {layer: kv[layer] for layer in cfg.compressed_layers})
        row: dict[str, Any] = {"calibration": name, "position_centring": cfg.position_centring, "bits": b}
        for kind in ("k", "v"):
            for lo, hi in args.ranges:
                row[f"{kind}_{lo}-{hi}"] = relative(*sq[kind], lo, hi)
        rows.append(row)
        err, norm = sq["k"]
        starts = range(SINKS, args.length - BIN + 1, BIN)
        curves[f"{name} @ {b:g}"] = [(s + BIN / 2, relative(err, norm, s, s + BIN)) for s in starts]
    seq_lens = {name: cfg.calibration.get("seq_len") for name, cfg in cfgs.items()}
    meta = {"calibrations": {name: str(c) for name, c in zip(cfgs, args.calibrations, strict=True)},
            "calibration_seq_len": seq_lens, "length": args.length, "ranges": args.ranges, "sinks": SINKS,
            "torch": torch.__version__, "argv": sys.argv[1:] if argv is None else argv}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "position_centring.json").write_text(json.dumps({"meta": meta, "rows": rows, "curves": curves},
                                                               indent=2))
    md = markdown(rows, meta)
    (args.out / "position_centring.md").write_text(md)
    plot(curves, seq_lens, args.out / "position_centring.png")
    print(md)
    print(f"wrote {args.out}/position_centring.{{json,md,png}}", file=sys.stderr)
    return 0


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    ranges = [f"{lo}-{hi}" for lo, hi in meta["ranges"]]
    lines = [
        "### Relative key / value error by position",
        "",
        f"- One {meta['length']}-token window of evaluation text; every compressed layer and head; sinks "
        f"(first {meta['sinks']}) not scored; calibration sequence lengths: "
        + ", ".join(f"`{n}` {s}" for n, s in meta["calibration_seq_len"].items()),
        f"- Command: `python scripts/eval_position_centring.py {' '.join(meta['argv'])}`",
        "",
        "| calibration | centring | bits | " + " | ".join(f"key err {r}" for r in ranges) + " | "
        + " | ".join(f"value err {r}" for r in ranges) + " |",
        "|---|---|---:|" + "---:|" * (2 * len(ranges)),
    ]
    for r in rows:
        cells = [f"{r[f'k_{x}']:.4f}" for x in ranges] + [f"{r[f'v_{x}']:.4f}" for x in ranges]
        lines.append(f"| {r['calibration']} | {r['position_centring'] or 'mean'} | {r['bits']:g} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[tuple[float, float]]], seq_lens: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    for s in sorted({s for s in seq_lens.values() if s}):
        ax.axvline(s, color="grey", ls=":", lw=1)
    ax.set_xlabel(f"position (bins of {BIN} tokens; dotted: calibration sequence length)")
    ax.set_ylabel("relative key error (all layers and heads)")
    ax.set_title("Key round-trip error by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
