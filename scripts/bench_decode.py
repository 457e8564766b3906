#!/usr/bin/env python
"""Per-layer decode attention time: spectralkv's fused kernel vs fp16 SDPA vs dequantize-then-SDPA.

Shapes default to one Llama-3.1-8B layer (8 KV heads, head_dim 128, 4 query heads per KV head), one query token per
sequence, contexts 1k-128k, batch 1-16, our kernel at 2, 2.5, 3 and 4 bits per coordinate (plus an fp16 per-token
scale per head, 4 sink tokens and a 32-token window in fp16, as the cache holds them). Codes are random bytes (every
bit pattern is a valid code) and the quantizers random: timing does not depend on the values.

Timing is ``triton.testing.do_bench`` (median, L2 flushed before every repetition by zeroing a 256 MB buffer).
GB/s is the bytes of the method's stored cache for that layer (codes + scales + fp16 window, or the fp16 K/V)
divided by the time; the dequantize-then-SDPA path also writes and re-reads an fp16 copy, which is not counted.

Writes ``<out>/bench_decode.csv`` (one row per case, with GPU name, timestamp, versions) and
``<out>/bench_decode.png``. Needs a CUDA GPU; on a machine without one it exits with status 2 and says so.

    python scripts/bench_decode.py --contexts 1k 8k 32k 128k --batches 1 4 16 --bits 2 2.5 3 4
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import sys
from pathlib import Path
from typing import Any

import torch

from spectralkv.codebook import fit_codebooks
from spectralkv.quantizer import SpectralQuantizer

DEFAULT_CONTEXTS = ["1k", "4k", "16k", "32k", "64k", "128k"]
METHODS = ("spectralkv", "fp16-sdpa", "dequant-sdpa")


def parse_size(text: str) -> int:
    """``"4k"`` -> 4096, ``"1m"`` -> 1048576, ``"1500"`` -> 1500."""
    t = text.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        value = int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096 or 4k)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--contexts", nargs="+", type=parse_size, default=[parse_size(c) for c in DEFAULT_CONTEXTS],
                   help="compressed context lengths, e.g. 1k 4k 128k (default: %(default)s)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16], help="batch sizes (default: %(default)s)")
    p.add_argument("--bits", nargs="+", type=float, default=[2.0, 2.5, 3.0, 4.0],
                   help="bits per coordinate for spectralkv (default: %(default)s)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--group", type=int, default=4, help="query heads per KV head")
    p.add_argument("--window", type=int, default=32, help="recent tokens kept in fp16")
    p.add_argument("--sinks", type=int, default=4, help="leading tokens kept in fp16")
    p.add_argument("--no-token-scale", dest="token_scale", action="store_false",
                   help="no fp16 per-token scale (default: with)")
    p.add_argument("--unpack", choices=("gather", "register"), default="gather", help="kernel lookup mode")
    p.add_argument("--num-splits", type=int, default=None, help="splits per sequence (default: from the SM count)")
    p.add_argument("--block-t", type=int, default=32, help="tokens per tile")
    p.add_argument("--num-warps", type=int, default=4, help="warps per program")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    p.add_argument("--out", type=Path, default=Path("bench_results"), help="output folder (default: %(default)s)")
    args = p.parse_args(argv)
    for name in ("batches", "bits"):
        bad = [v for v in getattr(args, name) if v <= 0]
        if bad:
            p.error(f"--{name} must be positive, got {bad}")
    return args


def bit_mix(d: int, bits: float) -> list[int]:
    """Per-coordinate widths averaging ``bits``: floor/ceil widths in groups of 8 (what the allocator produces)."""
    lo = math.floor(bits)
    groups = d // 8
    n_hi = round((bits - lo) * groups)
    return [lo + 1] * (8 * n_hi) + [lo] * (8 * (groups - n_hi))


_CODEBOOKS: dict[str, torch.Tensor] = {}


def make_quantizer(kv_heads: int, head_dim: int, bits: float, token_scale: bool, seed: int = 0) -> SpectralQuantizer:
    """A random quantizer with the layout of a real one at ``bits`` per coordinate."""
    if "gauss" not in _CODEBOOKS:
        _CODEBOOKS["gauss"] = fit_codebooks(torch.randn(8192, generator=torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(kv_heads, head_dim, head_dim, generator=g)).Q
    eig = torch.logspace(1, -2, head_dim).expand(kv_heads, head_dim).contiguous()
    bits_t = torch.tensor(bit_mix(head_dim, bits), dtype=torch.uint8).expand(kv_heads, head_dim).contiguous()
    return SpectralQuantizer(torch.randn(kv_heads, head_dim, generator=g), basis, eig, _CODEBOOKS["gauss"], bits_t,
                             token_scale)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def run_case(method: str, bits: float | None, context: int, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Time one case; returns a CSV row (``time_us`` NaN and ``note`` set when it runs out of memory)."""
    from spectralkv.kernels.decode_attention import decode_attention
    from spectralkv.kernels.ref import PackedSide
    from triton.testing import do_bench

    dev = torch.device("cuda")
    hkv, d, g = args.kv_heads, args.head_dim, args.group
    w = args.window + args.sinks + 1
    row: dict[str, Any] = dict(method=method, bits=bits if bits is not None else 16, context=context, batch=batch,
                               kv_heads=hkv, head_dim=d, group=g, note="")
    fn = None
    try:
        q = torch.randn(batch, hkv * g, d, device=dev, dtype=torch.float16)
        if method == "fp16-sdpa":
            k = torch.randn(batch, hkv, context + w, d, device=dev, dtype=torch.float16)
            v = torch.randn_like(k)
            q4 = q[:, :, None]
            row["bytes"] = _nbytes(k, v)

            def fn() -> Any:
                return torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
        else:
            qk = make_quantizer(hkv, d, bits, args.token_scale, seed=1)
            qv = make_quantizer(hkv, d, bits, args.token_scale, seed=2)
            kc = torch.randint(0, 256, (batch, context, qk.row_bytes), dtype=torch.uint8, device=dev)
            vc = torch.randint(0, 256, (batch, context, qv.row_bytes), dtype=torch.uint8, device=dev)
            ks = vs = None
            if args.token_scale:
                ks = (torch.rand(batch, context, hkv, device=dev) + 0.5).half()
                vs = (torch.rand(batch, context, hkv, device=dev) + 0.5).half()
            k_fp = torch.randn(batch, hkv, w, d, device=dev, dtype=torch.float16)
            v_fp = torch.randn_like(k_fp)
            row["bytes"] = _nbytes(kc, vc, ks, vs, k_fp, v_fp)
            kside, vside = PackedSide(qk, kc, ks), PackedSide(qv, vc, vs)
            if method == "spectralkv":
                def fn() -> Any:
                    return decode_attention(q, kside, vside, k_fp, v_fp, num_splits=args.num_splits,
                                            block_t=args.block_t, unpack=args.unpack, num_warps=args.num_warps)
            else:
                q4 = q[:, :, None]

                def fn() -> Any:
                    keys = torch.cat([k_fp[:, :, : args.sinks], qk.decode(kc, ks, torch.float16),
                                      k_fp[:, :, args.sinks :]], 2)
                    values = torch.cat([v_fp[:, :, : args.sinks], qv.decode(vc, vs, torch.float16),
                                        v_fp[:, :, args.sinks :]], 2)
                    return torch.nn.functional.scaled_dot_product_attention(q4, keys, values, enable_gqa=True)
        fn()
        torch.cuda.synchronize()
        ms = do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")
        row["time_us"] = ms * 1e3
        row["gbps"] = row["bytes"] / (ms * 1e-3) / 1e9
    except torch.cuda.OutOfMemoryError:
        row.update(time_us=float("nan"), gbps=float("nan"), note="out of memory")
        row.setdefault("bytes", 0)
    finally:
        fn = None
        torch.cuda.empty_cache()
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r["batch"] == batch and not math.isnan(r["time_us"]):
                label = r["method"] if r["method"] != "spectralkv" else f"spectralkv {r['bits']:g} bit"
                if r["method"] == "dequant-sdpa":
                    label = f"dequant+SDPA {r['bits']:g} bit"
                series.setdefault(label, []).append((r["context"], r["time_us"]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="time per layer (us)",
               title=f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.",
              file=sys.stderr)
        return 2
    import triton

    import spectralkv

    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    meta = dict(gpu=gpu, timestamp=stamp, spectralkv=spectralkv.__version__, torch=torch.__version__,
                triton=triton.__version__)
    rows: list[dict[str, Any]] = []
    cases = [(m, None) for m in ("fp16-sdpa",) if m in args.methods]
    cases += [(m, b) for m in ("spectralkv", "dequant-sdpa") if m in args.methods for b in args.bits]
    for batch in args.batches:
        for context in args.contexts:
            for method, bits in cases:
                row = {**run_case(method, bits, context, batch, args), **meta}
                rows.append(row)
                print(f"{method:13s} bits={row['bits']:<4g} ctx={context:<7d} batch={batch:<3d} "
                      f"{row['time_us']:10.1f} us {row['gbps']:8.1f} GB/s {row['note']}", flush=True)
    csv_path = args.out / "bench_decode.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "bench_decode.png")
    print(f"wrote {csv_path} and {args.out / 'bench_decode.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
