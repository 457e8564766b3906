"""Decode-step time of the PyTorch (CPU) path: the uncompressed cache vs spectralkv, unfused and fused.

On CPU spectralkv runs pure PyTorch: the unfused cache decodes every compressed token back to a key and a value on
every step (then the model's own attention runs), the fused one (``attach(..., fused=True)``) attends in the rotated
basis straight from the decoded codes, with no un-rotation of the cache. Both decode the whole store every step, so
their time grows with the context where the uncompressed cache's barely does; this script measures by how much.

Each (batch, context) case prefills random tokens once with an ordinary cache, hands the same keys and values to
every method (``ingest``: each compresses them as its own prefill would), then times single-token forward passes
(the median of ``--steps``). Default model: the embedded SmolLM2-135M-Instruct, float32 (``--tiny``: a 2-layer toy
model, for the tests). Default calibration: synthetic, at ``--bits``, RoPE-aware like the default calibrations,
with 0.3% exact outliers (speed does not depend on the fitted values); ``--calibration`` takes a real one.

    .venv/bin/python scripts/bench_cpu_decode.py --contexts 512 2048 --batches 1 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import TINY, synthetic_calibration  # noqa: E402

METHODS = ("uncompressed", "spectralkv", "spectralkv-fused")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048], help="prompt tokens per case")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per case (the median is reported)")
    p.add_argument("--bits", type=float, default=3.0, help="spectralkv budget, bits per coordinate")
    p.add_argument("--calibration", help="a calibration folder or Hub id (default: synthetic, see above)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tiny", action="store_true", help=f"2-layer toy model {TINY} instead of SmolLM2")
    p.add_argument("--out", type=Path, default=Path("docs/results/cpu_decode"))
    args = p.parse_args(argv)
    if args.steps < 1 or min(args.contexts) < 1 or min(args.batches) < 1:
        p.error("--steps, --contexts and --batches must be positive")
    return args


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(**TINY, max_position_embeddings=max(args.contexts) + 64, pad_token_id=0)
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
        model.config.spectralkv_base_model = "random-llama-tiny"
    else:
        from spectralkv.models import load_model

        model, _ = load_model(dtype=torch.float32)
    if args.calibration:
        from spectralkv import SpectralKVConfig

        return model, SpectralKVConfig.from_pretrained(args.calibration).with_bits(args.bits)
    return model, synthetic_calibration(model, args.bits, window=32, sinks=4, outlier_fraction=0.003,
                                        position_centring="rope")


def new_cache(model: torch.nn.Module, method: str, cfg: Any) -> Any:
    if method == "uncompressed":
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    if method == "spectralkv":
        from spectralkv import SpectralKVCache

        return SpectralKVCache(model, cfg)
    from spectralkv.fused import FusedSpectralKVCache

    return FusedSpectralKVCache(model, cfg)


def fill(cache: Any, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Hand every layer the prefill's keys and values as its own prefill would store them."""
    for i, (k, v) in enumerate(kv):
        layer = cache.layers[i]
        if hasattr(layer, "ingest"):
            layer.ingest(k, v)
        else:
            layer.update(k, v)


@torch.no_grad()
def time_steps(model: torch.nn.Module, cache: Any, batch: int, steps: int, vocab: int) -> float:
    """Median seconds of one single-token forward pass over ``cache`` (after one untimed step)."""
    g = torch.Generator().manual_seed(1)
    times = []
    for i in range(steps + 1):
        ids = torch.randint(0, vocab, (batch, 1), generator=g)
        t0 = time.perf_counter()
        model(ids, cache=cache, use_cache=True)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from spectralkv.fused import enable_fused

    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg = load(args)
    vocab = int(model.config.vocab_size)
    rows = []
    cases = [(b, c) for b in args.batches for c in args.contexts]
    for batch, context in tqdm(cases, desc="cases"):
        g = torch.Generator().manual_seed(0)
        prefill = new_cache(model, "uncompressed", cfg)
        model(torch.randint(0, vocab, (batch, context), generator=g), cache=prefill, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in prefill.layers]
        del prefill
        for method in args.methods:
            cache = new_cache(model, method, cfg)
            fill(cache, kv)
            previous = enable_fused(model) if method == "spectralkv-fused" else None
            try:
                seconds = time_steps(model, cache, batch, args.steps, vocab)
            finally:
                if previous is not None:
                    model.set_attn_implementation(previous)
            rows.append({"method": method, "batch": batch, "context": context, "ms_per_step": 1e3 * seconds,
                         "tokens_per_s": batch / seconds})
    base = {(r["batch"], r["context"]): r["ms_per_step"] for r in rows if r["method"] == "uncompressed"}
    for r in rows:
        ref = base.get((r["batch"], r["context"]))
        r["vs_uncompressed"] = None if ref is None else r["ms_per_step"] / ref
    meta = {"model": "tiny" if args.tiny else "SmolLM2-135M-Instruct (float32)", "bits": args.bits,
            "calibration": args.calibration or "synthetic (RoPE-aware, 0.3% outliers)", "steps": args.steps,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d")}
    return rows, meta


def write_markdown(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path, command: str) -> None:
    lines = [f"# CPU decode step ({meta['model']}, {meta['bits']} bits, {meta['threads']} threads, {meta['date']})",
             "", f"Command: `{command}`; calibration: {meta['calibration']}; median of {meta['steps']} steps.", "",
             "| method | batch | context | ms / step | tokens/s | x uncompressed time |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = "" if r["vs_uncompressed"] is None else f"{r['vs_uncompressed']:.2f}"
        lines.append(f"| {r['method']} | {r['batch']} | {r['context']} | {r['ms_per_step']:.1f} | "
                     f"{r['tokens_per_s']:.1f} | {ratio} |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.6), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        for method in METHODS:
            pts = sorted((r["context"], r["ms_per_step"]) for r in rows
                         if r["method"] == method and r["batch"] == batch)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per decode step")
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, meta = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "scripts/bench_cpu_decode.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_markdown(rows, meta, args.out / "results.md", command.strip())
    plot(rows, args.out / "cpu_decode.png")
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
