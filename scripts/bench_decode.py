#!/usr/bin/env python
"""Per-layer decode attention time: spectralkv's fused kernel vs fp16 flash-decoding, fp16 SDPA, dequantize-then-SDPA.

Shapes default to one Llama-3.1-8B layer (8 KV heads, head_dim 128, 4 query heads per KV head), one query token per
sequence, contexts 1k-128k, batch 1-16, our kernel at 2, 2.5, 3 and 4 bits per coordinate (plus an fp16 per-token
scale per head, 4 sink tokens and a 32-token window in fp16, as the cache holds them). Codes are random bytes (every
bit pattern is a valid code) and the quantizers random: timing does not depend on the values.

Methods (one CSV row per case):

* ``spectralkv``: the fused Triton kernel reading the packed codes.
* ``fp16-flash``: the best fp16 flash-decoding available, the baseline of the targets: ``flash_attn_with_kvcache``
  when ``flash_attn`` imports, else torch SDPA forced to its FLASH and EFFICIENT backends in turn (GQA folded into
  the query length, no copy) and the faster kept; the ``impl`` column says which ran.
* ``fp16-sdpa``: ``scaled_dot_product_attention(..., enable_gqa=True)`` with torch's own backend choice, as
  transformers calls it on a decode step without a mask.
* ``dequant-sdpa``: decode the codes to fp16 with the PyTorch quantizer, then SDPA (what an unfused cache costs).

Timing (``--timer``): ``cudagraph`` (default) captures the case in a CUDA graph so Python launch overhead is not
measured. With ``--l2 flush`` (default) each repetition is one graph replay after zeroing a 256 MB buffer outside the
timed region (``triton.testing.do_bench_cudagraph`` cannot flush L2, and at batch 1 a compressed 32k cache fits in an
H100's 50 MB L2); ``--l2 warm`` uses ``do_bench_cudagraph`` itself. When graph capture fails for a case it is timed
with ``triton.testing.do_bench`` (L2 flushed) and the row's note says so. ``--timer plain`` always uses ``do_bench``.
The median is reported.

GB/s is the bytes of the method's stored cache for that layer (codes + scales + fp16 window, or the fp16 K/V)
divided by the time; the dequantize-then-SDPA path also writes and re-reads an fp16 copy, which is not counted.
``pct_of_copy_bw`` compares it with a device-to-device copy measured on the same GPU at the start (read + write
bytes / time), and ``speedup_vs_flash`` divides the time of the fastest fp16 row (``fp16-flash`` or ``fp16-sdpa``)
at the same batch and context by the row's time. The summary checks the targets at 32k context: >= 4x faster than
fp16 flash-decoding at 2.5 bits, >= 2.5x at 4 bits, >= 70% of the measured copy bandwidth (a report, not an assert).

Writes ``<out>/bench_decode.csv`` (one row per case, with GPU name, timestamp, versions), ``<out>/bench_decode.md``
(the table ready for the README, with GPU, date and command line) and ``<out>/bench_decode.png``. Needs a CUDA GPU;
on a machine without one it exits with status 2 and says so.

    python scripts/bench_decode.py --contexts 1k 8k 32k 128k --batches 1 4 16 --bits 2 2.5 3 4
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spectralkv.codebook import fit_codebooks
from spectralkv.quantizer import Outliers, SpectralQuantizer

DEFAULT_CONTEXTS = ["1k", "4k", "16k", "32k", "64k", "128k"]
METHODS = ("spectralkv", "fp16-flash", "fp16-sdpa", "dequant-sdpa")
FP16_METHODS = ("fp16-flash", "fp16-sdpa")
TIMERS = ("cudagraph", "plain")
FLUSH_BYTES = 256 * 1024 * 1024  # what triton's do_bench zeroes between repetitions


@dataclass(frozen=True)
class Target:
    """One of the issue's speed targets, checked on the spectralkv rows at the target context."""

    name: str
    column: str  # row field compared with the threshold
    threshold: float
    bits: float | None  # only rows at these bits; None: every spectralkv row
    unit: str


TARGETS = (
    Target("speedup vs fp16 flash-decoding at 2.5 bits", "speedup_vs_flash", 4.0, 2.5, "x"),
    Target("speedup vs fp16 flash-decoding at 4 bits", "speedup_vs_flash", 2.5, 4.0, "x"),
    Target("share of the measured copy bandwidth", "pct_of_copy_bw", 70.0, None, "%"),
)


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
    p.add_argument("--position-centring", choices=("rope", "none"), default="rope",
                   help="keys centred on their pre-RoPE mean rotated to each position, as calibrations of RoPE models "
                        "are by default (the kernel's K_POS variant), or on one mean (default: %(default)s)")
    p.add_argument("--rope-theta", type=float, default=500000.0, help="RoPE base (default: Llama-3.1's, %(default)s)")
    p.add_argument("--no-token-scale", dest="token_scale", action="store_false",
                   help="no per-token scale (default: with)")
    p.add_argument("--scale-format", choices=("log8", "fp16"), default="log8",
                   help="how the per-token scales are stored: one byte on a log scale, as calibrations write them by "
                        "default, or fp16 (default: %(default)s)")
    p.add_argument("--outlier-fraction", type=float, default=0.0,
                   help="share of coordinates kept as exact outliers (SmolLM2's default calibration: 0.0057; "
                        "default: %(default)s)")
    p.add_argument("--unpack", choices=("gather", "register"), default="gather",
                   help="how the kernel reads code bytes (default: %(default)s)")
    p.add_argument("--lookup", choices=("table", "select"), default="table",
                   help="how the kernel finds centroids: table gathers, select keeps 1-2 bit levels in registers\n"
                        "(default: %(default)s)")
    p.add_argument("--num-splits", type=int, default=None, help="splits per sequence (default: from the SM count)")
    p.add_argument("--block-t", type=int, default=32, help="tokens per tile")
    p.add_argument("--num-warps", type=int, default=4, help="warps per program")
    p.add_argument("--timer", choices=TIMERS, default="cudagraph",
                   help="cudagraph: time CUDA-graph replays, falling back to do_bench when capture fails;\n"
                        "plain: triton.testing.do_bench (default: %(default)s)")
    p.add_argument("--no-cuda-graph", dest="timer", action="store_const", const="plain", help="same as --timer plain")
    p.add_argument("--l2", choices=("flush", "warm"), default="flush",
                   help="flush: zero a 256 MB buffer before every timed repetition; warm: do not (graph timer\n"
                        "only: triton's do_bench_cudagraph; do_bench always flushes) (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="repetitions, ms")
    p.add_argument("--copy-gb", type=float, default=2.0,
                   help="size of the buffer copied to measure bandwidth, GB (default: %(default)s)")
    p.add_argument("--target-context", type=parse_size, default=parse_size("32k"),
                   help="context at which the summary checks the targets (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench_results"), help="output folder (default: %(default)s)")
    args = p.parse_args(argv)
    for name in ("batches", "bits"):
        bad = [v for v in getattr(args, name) if v <= 0]
        if bad:
            p.error(f"--{name} must be positive, got {bad}")
    if args.copy_gb <= 0:
        p.error(f"--copy-gb must be positive, got {args.copy_gb}")
    if args.rope_theta <= 0:
        p.error(f"--rope-theta must be positive, got {args.rope_theta}")
    if not 0 <= args.outlier_fraction < 1:
        p.error(f"--outlier-fraction must be in [0, 1), got {args.outlier_fraction}")
    return args


def bit_mix(d: int, bits: float) -> list[int]:
    """Per-coordinate widths averaging ``bits``: floor/ceil widths in groups of 8 (what the allocator produces)."""
    lo = math.floor(bits)
    groups = d // 8
    n_hi = round((bits - lo) * groups)
    return [lo + 1] * (8 * n_hi) + [lo] * (8 * (groups - n_hi))


_CODEBOOKS: dict[str, torch.Tensor] = {}


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """``[D]`` RoPE frequencies in the rotate_half layout (both halves the same)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return torch.cat([inv, inv]).float()


def make_quantizer(kv_heads: int, head_dim: int, bits: float, token_scale: bool, seed: int = 0,
                   rope_theta: float | None = None, scale_format: str = "log8") -> SpectralQuantizer:
    """A random quantizer with the layout of a real one at ``bits`` per coordinate; with ``rope_theta``, position-
    centred like a RoPE-aware calibration's keys (a random pre-RoPE mean); ``scale_format``: of its per-token
    scales (``log8`` over a range of 4 octaves, or ``fp16``)."""
    if "gauss" not in _CODEBOOKS:
        _CODEBOOKS["gauss"] = fit_codebooks(torch.randn(8192, generator=torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(kv_heads, head_dim, head_dim, generator=g)).Q
    eig = torch.logspace(1, -2, head_dim).expand(kv_heads, head_dim).contiguous()
    bits_t = torch.tensor(bit_mix(head_dim, bits), dtype=torch.uint8).expand(kv_heads, head_dim).contiguous()
    position = {} if rope_theta is None else dict(position_mean=torch.randn(kv_heads, head_dim, generator=g),
                                                  frequencies=rope_frequencies(head_dim, rope_theta))
    scale_range = (-2.0, 2.0) if token_scale and scale_format == "log8" else None
    return SpectralQuantizer(torch.randn(kv_heads, head_dim, generator=g), basis, eig, _CODEBOOKS["gauss"], bits_t,
                             token_scale, scale_range=scale_range, **position)


def random_outliers(batch: int, context: int, coords: int, fraction: float, device: torch.device | str,
                    seed: int = 0) -> Outliers | None:
    """Exact outliers shaped like a calibration's: about ``fraction`` of each token's ``coords`` coordinates, capped
    at 4x the average per token as the library caps them (None for ``fraction`` 0)."""
    if fraction <= 0:
        return None
    g = torch.Generator().manual_seed(seed)
    mean = fraction * coords
    cap = max(2, math.ceil(4 * mean))
    counts = torch.poisson(torch.full((batch, context), mean), generator=g).clamp_max(cap).to(torch.uint8)
    e = int(counts.long().sum())
    index = torch.randint(0, coords, (e,), generator=g).to(torch.uint8 if coords <= 256 else torch.int16)
    values = (3 * torch.randn(e, generator=g)).half()
    return Outliers(counts.to(device), index.to(device), values.to(device))


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------
_FLUSH: dict[str, torch.Tensor] = {}


def _flush_buffer() -> torch.Tensor:
    if "buf" not in _FLUSH:
        _FLUSH["buf"] = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    return _FLUSH["buf"]


def _do_bench(fn: Callable[[], Any], warmup: int, rep: int) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _do_bench_cudagraph(fn: Callable[[], Any], rep: int) -> float:
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=rep, return_mode="median"))


def graph_bench(fn: Callable[[], Any], rep: int, flush: torch.Tensor | None) -> float:
    """Median ms of one CUDA-graph replay of ``fn``, L2 flushed before each replay (outside the timed events).

    Why not ``do_bench_cudagraph``: it unrolls many calls in one graph and cannot flush L2 between them, so a cache
    smaller than L2 would be timed from L2. One replay per repetition keeps the flush and still has no Python launch
    overhead inside the timed region (the flush gives the host time to enqueue the replay).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n = int(min(1000, max(10, rep / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends, strict=True):
        if flush is not None:
            flush.zero_()
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    del graph
    return float(statistics.median(times))


def time_case(fn: Callable[[], Any], args: argparse.Namespace) -> tuple[float, str, bool, str]:
    """Time ``fn`` as ``args`` asks: ``(median ms, timer used, L2 flushed, note)``.

    A failed graph capture is not an error: the case is re-timed with ``do_bench`` and the note says why (some
    paths, e.g. ones that synchronise or copy from the host, cannot be captured).
    """
    note = ""
    if args.timer == "cudagraph":
        try:
            if args.l2 == "flush":
                return graph_bench(fn, args.rep, _flush_buffer()), "cudagraph+flush", True, ""
            return _do_bench_cudagraph(fn, args.rep), "do_bench_cudagraph", False, ""
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # capture not supported by something in fn
            msg = " ".join(str(exc).split())[:100]
            note = f"CUDA graph capture failed ({type(exc).__name__}: {msg}); timed with do_bench"
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    return _do_bench(fn, args.warmup, args.rep), "do_bench", True, note


def _time_copy(nbytes: int, warmup: int, rep: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return _do_bench(lambda: dst.copy_(src), warmup, rep)


def measure_copy_bandwidth(gb: float, warmup: int = 25, rep: int = 200) -> tuple[float, float]:
    """``(GB/s, GB copied)`` of a device-to-device copy of a ``gb``-GB buffer: (read + write bytes) / time.

    The reference for ``pct_of_copy_bw``: what this GPU really streams, rather than its datasheet peak. Far larger
    than L2, so no flush is needed; the buffer is halved on out-of-memory.
    """
    nbytes = int(gb * 1e9)
    while nbytes >= 1 << 26:
        oom = False
        try:
            ms = _time_copy(nbytes, warmup, rep)
        except torch.cuda.OutOfMemoryError:
            oom = True
        torch.cuda.empty_cache()
        if not oom:
            return 2 * nbytes / (ms * 1e-3) / 1e9, nbytes / 1e9
        nbytes //= 2
    return float("nan"), 0.0


# ---------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------
def _flash_candidates(q: torch.Tensor, batch: int, hkv: int, length: int, d: int
                      ) -> tuple[list[tuple[str, Callable[[], Any]]], int, str]:
    """fp16 flash-decoding implementations to try, best first: ``([(impl, fn)], K/V bytes, why others are absent)``.

    ``flash_attn_with_kvcache`` if flash_attn imports (its own ``[B, S, H, D]`` layout), else SDPA forced to one
    backend at a time, with the query heads of a GQA group as the query length (``[B, Hkv, G, D]``: the same math
    for a single decode token, and no repeated K/V).
    """
    dev = q.device
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception as exc:  # not installed, or built for another torch/CUDA
        flash_attn_with_kvcache = None
        why = f"flash_attn unavailable ({type(exc).__name__})"
    if flash_attn_with_kvcache is not None:
        import flash_attn

        kc = torch.randn(batch, length, hkv, d, device=dev, dtype=torch.float16)
        vc = torch.randn_like(kc)
        q_fa = q[:, None]  # [B, 1, Hq, D]
        return [(f"flash_attn {flash_attn.__version__} flash_attn_with_kvcache",
                 lambda: flash_attn_with_kvcache(q_fa, kc, vc))], _nbytes(kc, vc), ""
    from torch.nn.attention import SDPBackend

    k = torch.randn(batch, hkv, length, d, device=dev, dtype=torch.float16)
    v = torch.randn_like(k)
    out = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def fn(backend: SDPBackend = backend) -> Any:
            return sdpa_decode(q, k, v, backend)

        out.append((f"torch sdpa {backend.name} (GQA group as query length)", fn))
    return out, _nbytes(k, v), why


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Any) -> torch.Tensor:
    """One decode token per sequence, ``q [B, Hq, D]`` over ``k``/``v [B, Hkv, S, D]``, with SDPA forced to
    ``backend``: the query heads of a GQA group become the query length (``[B, Hkv, G, D]``), which is the same
    attention for a single token and needs no repeated K/V (not every backend takes ``enable_gqa``)."""
    from torch.nn.attention import sdpa_kernel

    b, hq, d = q.shape
    with sdpa_kernel(backend):
        out = torch.nn.functional.scaled_dot_product_attention(q.view(b, k.shape[1], hq // k.shape[1], d), k, v)
    return out.reshape(b, hq, d)


def compressed_inputs(bits: float, batch: int, context: int, args: argparse.Namespace, dev: torch.device | str
                      ) -> tuple[Any, Any, torch.Tensor, torch.Tensor, int]:
    """Random packed keys and values of ``context`` tokens at ``bits`` (codes, scales, outliers; keys position-
    centred with ``--position-centring rope``, the first compressed token at position ``--sinks``), the
    full-precision sinks + window + new token, and the bytes a decode step reads."""
    from spectralkv.kernels.ref import PackedSide

    hkv, d = args.kv_heads, args.head_dim
    w = args.window + args.sinks + 1
    rope = args.position_centring == "rope"
    qk = make_quantizer(hkv, d, bits, args.token_scale, seed=1, rope_theta=args.rope_theta if rope else None,
                        scale_format=args.scale_format)
    qv = make_quantizer(hkv, d, bits, args.token_scale, seed=2, scale_format=args.scale_format)
    kc = torch.randint(0, 256, (batch, context, qk.row_bytes), dtype=torch.uint8, device=dev)
    vc = torch.randint(0, 256, (batch, context, qv.row_bytes), dtype=torch.uint8, device=dev)
    ks = vs = None
    if args.token_scale and args.scale_format == "log8":
        ks = torch.randint(96, 160, (batch, context, hkv), dtype=torch.uint8, device=dev)
        vs = torch.randint(96, 160, (batch, context, hkv), dtype=torch.uint8, device=dev)
    elif args.token_scale:
        ks = (torch.rand(batch, context, hkv, device=dev) + 0.5).half()
        vs = (torch.rand(batch, context, hkv, device=dev) + 0.5).half()
    k_fp = torch.randn(batch, hkv, w, d, device=dev, dtype=torch.float16)
    v_fp = torch.randn_like(k_fp)
    ko = random_outliers(batch, context, hkv * d, args.outlier_fraction, dev, seed=3)
    vo = random_outliers(batch, context, hkv * d, args.outlier_fraction, dev, seed=4)
    extra = [t for o in (ko, vo) if o is not None for t in (o.counts, o.index, o.values)]
    first = torch.full((batch, 1), args.sinks, dtype=torch.long, device=dev) if rope else None
    return (PackedSide(qk, kc, ks, ko, first), PackedSide(qv, vc, vs, vo), k_fp, v_fp,
            _nbytes(kc, vc, ks, vs, k_fp, v_fp, *extra))


def dequant_attention(q4: torch.Tensor, kside: Any, vside: Any, k_fp: torch.Tensor, v_fp: torch.Tensor, sinks: int
                      ) -> torch.Tensor:
    """The dequantize-then-SDPA baseline: decode every packed token (at its position), then SDPA over all."""
    keys = torch.cat([k_fp[:, :, :sinks], kside.quantizer.decode(kside.codes, kside.scales, k_fp.dtype,
                                                                  kside.outliers, kside.token_positions()),
                      k_fp[:, :, sinks:]], 2)
    values = torch.cat([v_fp[:, :, :sinks], vside.quantizer.decode(vside.codes, vside.scales, v_fp.dtype,
                                                                    vside.outliers), v_fp[:, :, sinks:]], 2)
    return torch.nn.functional.scaled_dot_product_attention(q4, keys, values, enable_gqa=True)


def run_case(method: str, bits: float | None, context: int, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Time one case; returns a CSV row (``time_us`` NaN and ``note`` set when it runs out of memory)."""
    from spectralkv.kernels.decode_attention import decode_attention

    dev = torch.device("cuda")
    hkv, d, g = args.kv_heads, args.head_dim, args.group
    w = args.window + args.sinks + 1
    row: dict[str, Any] = dict(method=method, bits=bits if bits is not None else 16, context=context, batch=batch,
                               kv_heads=hkv, head_dim=d, group=g, impl="", bytes=0, time_us=float("nan"),
                               gbps=float("nan"), timer="", l2_flushed="", note="")
    fn = None
    candidates: list[tuple[str, Callable[[], Any]]] = []
    try:
        q = torch.randn(batch, hkv * g, d, device=dev, dtype=torch.float16)
        if method == "fp16-flash":
            candidates, row["bytes"], why = _flash_candidates(q, batch, hkv, context + w, d)
            row["note"] = why
        elif method == "fp16-sdpa":
            k = torch.randn(batch, hkv, context + w, d, device=dev, dtype=torch.float16)
            v = torch.randn_like(k)
            q4 = q[:, :, None]
            row["bytes"] = _nbytes(k, v)

            def fn() -> Any:
                return torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=True)

            candidates = [("torch sdpa enable_gqa=True, default backend (transformers' decode call)", fn)]
        else:
            kside, vside, k_fp, v_fp, row["bytes"] = compressed_inputs(bits, batch, context, args, dev)
            centring = ", keys position-centred" if kside.positions is not None else ""
            if method == "spectralkv":
                def fn() -> Any:
                    return decode_attention(q, kside, vside, k_fp, v_fp, num_splits=args.num_splits,
                                            block_t=args.block_t, unpack=args.unpack, lookup=args.lookup,
                                            num_warps=args.num_warps)

                candidates = [(f"triton fused kernel, unpack={args.unpack}, lookup={args.lookup}{centring}", fn)]
            else:
                q4 = q[:, :, None]

                def fn() -> Any:
                    return dequant_attention(q4, kside, vside, k_fp, v_fp, args.sinks)

                candidates = [(f"PyTorch quantizer decode + torch sdpa enable_gqa=True{centring}", fn)]
        results, failures = [], []
        for impl, cand in candidates:
            try:
                cand()
                torch.cuda.synchronize()
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # e.g. an SDPA backend that does not take these shapes: try the next one
                failures.append(f"{impl}: {type(exc).__name__}: {' '.join(str(exc).split())[:80]}")
                continue
            ms, timer, flushed, note = time_case(cand, args)
            results.append((ms, impl, timer, flushed, note))
        if not results:
            raise RuntimeError("no implementation ran: " + "; ".join(failures))
        results.sort(key=lambda r: r[0])
        ms, impl, timer, flushed, note = results[0]
        others = [f"{i}: {m * 1e3:.1f} us" for m, i, *_ in results[1:]] + failures
        row.update(impl=impl, timer=timer, l2_flushed=flushed, time_us=ms * 1e3,
                   gbps=row["bytes"] / (ms * 1e-3) / 1e9)
        row["note"] = "; ".join(x for x in (row["note"], note, *(f"also tried {o}" for o in others)) if x)
    except torch.cuda.OutOfMemoryError:
        row.update(time_us=float("nan"), gbps=float("nan"), note="out of memory")
    except Exception as exc:  # one broken case must not lose a long run: the row says what happened
        msg = " ".join(str(exc).split())[:300]
        row.update(time_us=float("nan"), gbps=float("nan"), note=f"failed: {type(exc).__name__}: {msg}")
    finally:
        fn = None
        candidates = []
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------------------------
# Derived columns, targets, reports (pure: tested on hand-made rows)
# ---------------------------------------------------------------------------------------------------------------
def is_finite(x: Any) -> bool:
    """A real, finite number (CSV cells of failed cases hold NaN or text)."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def add_derived(rows: list[dict[str, Any]], copy_gbps: float) -> None:
    """Fill ``copy_gbps``, ``pct_of_copy_bw``, ``speedup_vs_flash`` and ``baseline`` in place.

    The speedup of a compressed row is the time of the fastest fp16 row (any of ``FP16_METHODS``) at the same
    batch and context divided by its own; NaN where either is missing (not measured, out of memory).
    """
    best: dict[tuple[int, int], dict[str, Any]] = {}
    for r in rows:
        if r["method"] in FP16_METHODS and is_finite(r["time_us"]):
            key = (r["batch"], r["context"])
            if key not in best or r["time_us"] < best[key]["time_us"]:
                best[key] = r
    for r in rows:
        r["copy_gbps"] = copy_gbps
        r["pct_of_copy_bw"] = 100 * r["gbps"] / copy_gbps if is_finite(r["gbps"]) and is_finite(copy_gbps) else float(
            "nan")
        base = best.get((r["batch"], r["context"]))
        if r["method"] not in FP16_METHODS and base is not None and is_finite(r["time_us"]):
            r["speedup_vs_flash"] = base["time_us"] / r["time_us"]
            r["baseline"] = base["method"]
        else:
            r["speedup_vs_flash"] = float("nan")
            r["baseline"] = ""


def check_targets(rows: list[dict[str, Any]], context: int = 32768,
                  targets: Sequence[Target] = TARGETS) -> list[dict[str, Any]]:
    """One result per target and spectralkv row at ``context`` (per batch, and per bits for bandwidth).

    ``status`` is ``"PASS"``, ``"FAIL"`` (including a case that ran out of memory) or ``"NOT MEASURED"`` (no such
    row: that bit width or context was not run).
    """
    out = []
    for t in targets:
        matching = [r for r in rows if r["method"] == "spectralkv" and r["context"] == context
                    and (t.bits is None or math.isclose(float(r["bits"]), t.bits))]
        if not matching:
            out.append(dict(target=t.name, batch=None, bits=t.bits, value=float("nan"), threshold=t.threshold,
                            unit=t.unit, status="NOT MEASURED"))
        for r in sorted(matching, key=lambda r: (r["batch"], r["bits"])):
            value = r.get(t.column, float("nan"))
            status = "PASS" if is_finite(value) and value >= t.threshold else "FAIL"
            out.append(dict(target=t.name, batch=r["batch"], bits=r["bits"], value=value, threshold=t.threshold,
                            unit=t.unit, status=status))
    return out


def format_targets(results: list[dict[str, Any]], context: int) -> list[str]:
    lines = []
    for r in results:
        where = f"ctx {context}" + ("" if r["batch"] is None else f", batch {r['batch']}, {r['bits']:g} bit")
        value = "n/a" if not is_finite(r["value"]) else f"{r['value']:.2f}{r['unit']}"
        lines.append(f"{r['status']:12s} {r['target']} ({where}): {value} (target >= {r['threshold']:g}{r['unit']})")
    return lines


def fmt(x: Any, spec: str) -> str:
    """``x`` formatted with ``spec``, or "-" for a case that did not run."""
    return format(x, spec) if is_finite(x) else "-"


def write_markdown(rows: list[dict[str, Any]], path: Path, meta: dict[str, Any], command: str,
                   target_lines: list[str], target_context: int) -> None:
    """The results as a Markdown table with its provenance, ready to paste into the README."""
    order = {m: i for i, m in enumerate(("fp16-flash", "fp16-sdpa", "spectralkv", "dequant-sdpa"))}
    lines = [
        "### Decode attention, one layer", "",
        f"- GPU: {meta.get('gpu', '?')}",
        f"- Date: {meta.get('timestamp', '?')}",
        f"- Command: `{command}`",
        f"- Versions: spectralkv {meta.get('spectralkv', '?')}, torch {meta.get('torch', '?')}, "
        f"triton {meta.get('triton', '?')}",
        f"- Measured copy bandwidth: {fmt(meta.get('copy_gbps'), '.0f')} GB/s (device-to-device copy of "
        f"{fmt(meta.get('copy_gb'), '.1f')} GB, read + write bytes / time)",
        f"- Timer: {meta.get('timer_setting', '?')}; median",
        "",
        "| batch | context | method | bits | time (us) | GB/s | % of copy BW | speedup vs best fp16 | impl | note |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["batch"], r["context"], order.get(r["method"], 9), r["bits"])):
        note = str(r.get("note", "")).replace("|", "/")
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['method']} | {r['bits']:g} | {fmt(r['time_us'], '.1f')} | "
            f"{fmt(r['gbps'], '.0f')} | {fmt(r.get('pct_of_copy_bw'), '.0f')} | "
            f"{fmt(r.get('speedup_vs_flash'), '.2f')} | {r.get('impl', '')} | {note} |")
    lines += ["", f"Targets at context {target_context}:", ""] + [f"- {t}" for t in target_lines]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


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
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.",
              file=sys.stderr)
        return 2
    import triton

    import spectralkv

    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "scripts/bench_decode.py", *argv])
    gpu = torch.cuda.get_device_name()
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    copy_gbps, copy_gb = measure_copy_bandwidth(args.copy_gb)
    print(f"{gpu}: device-to-device copy {copy_gbps:.0f} GB/s ({copy_gb:.1f} GB buffer)", flush=True)
    timer_setting = ("CUDA graph, one replay per repetition, L2 flushed" if args.l2 == "flush"
                     else "triton do_bench_cudagraph (L2 not flushed)") if args.timer == "cudagraph" \
        else "triton do_bench (L2 flushed)"
    meta = dict(gpu=gpu, timestamp=stamp, spectralkv=spectralkv.__version__, torch=torch.__version__,
                triton=triton.__version__, copy_gb=copy_gb)
    rows: list[dict[str, Any]] = []
    cases = [(m, None) for m in FP16_METHODS if m in args.methods]
    cases += [(m, b) for m in ("spectralkv", "dequant-sdpa") if m in args.methods for b in args.bits]
    for batch in args.batches:
        for context in args.contexts:
            for method, bits in cases:
                row = {**run_case(method, bits, context, batch, args), **meta}
                rows.append(row)
                print(f"{method:13s} bits={row['bits']:<4g} ctx={context:<7d} batch={batch:<3d} "
                      f"{row['time_us']:10.1f} us {row['gbps']:8.1f} GB/s "
                      f"{100 * row['gbps'] / copy_gbps:5.1f}% {row['impl']} {row['note']}", flush=True)
    add_derived(rows, copy_gbps)
    results = check_targets(rows, args.target_context)
    target_lines = format_targets(results, args.target_context)
    csv_path, md_path, png_path = (args.out / f"bench_decode.{ext}" for ext in ("csv", "md", "png"))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    write_markdown(rows, md_path, {**meta, "copy_gbps": copy_gbps, "timer_setting": timer_setting}, command,
                   target_lines, args.target_context)
    plot(rows, png_path)
    print(f"\nTargets at context {args.target_context} (measured copy bandwidth {copy_gbps:.0f} GB/s):")
    for line in target_lines:
        print("  " + line)
    print(f"wrote {csv_path}, {md_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
