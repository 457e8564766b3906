#!/usr/bin/env python
"""End-to-end ``model.generate`` throughput: an fp16 cache vs spectralkv with the fused decode kernel.

The model is Llama-3.1-8B-shaped (32 layers, hidden 4096, 32 heads, 8 KV heads, head_dim 128, MLP 14336; vocab
reduced to 32000) with random weights initialised directly on the GPU: nothing is downloaded, and decode speed
does not depend on the weights' values. The prompt is random token ids (batch 8 x 32k by default); generation is
greedy with ``min_new_tokens = max_new_tokens`` so it never stops early.

Methods:

* ``fp16-dynamic``: transformers' default ``DynamicCache`` (grows by ``torch.cat``: every step copies the cache).
* ``fp16-static``: ``cache_implementation="static"`` (preallocated; no copy per step), the stronger fp16 baseline.
* ``spectralkv``: ``spectralkv.attach(model, calibration, fused=True)``, so decode steps attend straight from the
  packed codes with the Triton kernel. The calibration is synthetic (random orthonormal bases, Gaussian-fitted
  codebooks, built with the library's ``SpectralKVConfig`` and bit allocator): random weights have no statistics
  worth measuring, and calibrating an 8B model would cost minutes for numbers the timing does not depend on.
* ``spectralkv-static``: the same kernels over ``spectralkv.static.StaticSpectralKVCache`` (preallocated for
  context + new tokens), which ``generate`` compiles on CUDA like ``fp16-static`` (``torch.compile``, CUDA graphs):
  the host no longer launches each operation of a decode step. The warm-up generate (a short prompt in the same
  cache, so the same shapes) pays the compilation.

Per run: prefill time (up to the first generated token), decode tokens/s over the remaining steps (prefill
excluded), peak GPU memory, and the KV cache's resident bytes. ``speedup_vs_fp16`` is against ``fp16-dynamic`` and
``speedup_vs_best_fp16`` against the faster fp16 method, at the same batch; the summary checks the target
(>= 2x fp16). ``--find-max-batch`` also doubles, then bisects, the batch at the given context until it runs out of
memory, for each method, and reports the largest batch that fits and its decode tokens/s (a few decode tokens per
try). Each try fills the cache with random keys and values instead of running the prefill (``--search-fill
synthetic``, the default: seconds instead of minutes per try; what must fit to serve a batch is its cache and the
decode steps, since servers prefill in chunks or sequence by sequence); ``--search-fill prefill`` runs the real one.

Writes ``<out>/bench_generate.csv``, ``<out>/bench_generate.md`` and ``<out>/bench_generate.png``. Needs a CUDA GPU
and exits with status 2 without one, except with ``--device cpu --tiny`` (a 2-layer toy model, a short context):
that path runs the whole script on CPU in seconds so the tests can check its logic.

    python scripts/bench_generate.py --batches 8 --context 32k --new-tokens 128
    python scripts/bench_generate.py --context 32k --find-max-batch --search-only --search-start 8
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import gc
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark, run as a script or loaded by path
from bench_decode import fmt, is_finite, parse_size  # noqa: E402

METHODS = ("fp16-dynamic", "fp16-static", "spectralkv", "spectralkv-static")
SKV_METHODS = ("spectralkv", "spectralkv-static")
FP16_METHODS = ("fp16-dynamic", "fp16-static")
TARGET_SPEEDUP = 2.0
LLAMA_8B = dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=14336, vocab_size=32000)
TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=256)
# --tiny defaults for what the full run sizes by context (only where the user did not give a value)
TINY_RUN = dict(context=64, batches=[2], new_tokens=8, window=8, sinks=2, warmup_tokens=2, search_new_tokens=2)
FULL_RUN = dict(context=32768, batches=[8], new_tokens=128, window=32, sinks=4, warmup_tokens=20,
                search_new_tokens=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default); cpu only with --tiny (a logic check, not a benchmark)")
    p.add_argument("--tiny", action="store_true",
                   help=f"2-layer toy model {TINY} and short defaults {TINY_RUN}")
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help=f"batch sizes (default: {FULL_RUN['batches']}, --tiny {TINY_RUN['batches']})")
    p.add_argument("--context", type=parse_size, default=None,
                   help=f"prompt tokens, e.g. 32k (default: {FULL_RUN['context']}, --tiny {TINY_RUN['context']})")
    p.add_argument("--new-tokens", type=int, default=None,
                   help=f"generated tokens, >= 2 (default: {FULL_RUN['new_tokens']}, --tiny {TINY_RUN['new_tokens']})")
    p.add_argument("--bits", nargs="+", type=float, default=[2.5, 4.0],
                   help="spectralkv budgets, bits per coordinate (default: %(default)s)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--window", type=int, default=None, help="recent tokens kept in full precision by spectralkv")
    p.add_argument("--flush-blocks", nargs="+", type=int, default=[1],
                   help="spectralkv runs per flush block: tokens leaving the window compressed together, so the\n"
                        "write kernel runs every N decode steps instead of every step (default: %(default)s)")
    p.add_argument("--sinks", type=int, default=None, help="leading tokens kept in full precision by spectralkv")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (e.g. a quick GPU check)")
    p.add_argument("--vocab", type=int, default=None, help="override the vocabulary size")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="model dtype (default: float16 on cuda, float32 on cpu)")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="prefill in chunks of this many tokens (generate's prefill_chunk_size; 0: one pass).\n"
                        "Bounds the prefill activations (and --find-max-batch --search-fill prefill's)")
    p.add_argument("--warmup-tokens", type=int, default=None,
                   help="tokens of an untimed warm-up generate per method, at a short context (compiles the "
                        "Triton kernels); 0: none")
    p.add_argument("--find-max-batch", action="store_true",
                   help="also find the largest batch that fits at --context, per method (doubling, then bisection)")
    p.add_argument("--max-batch-limit", type=int, default=1024, help="stop the search here (default: %(default)s)")
    p.add_argument("--search-new-tokens", type=int, default=None,
                   help="generated tokens per try of the batch search (default: 8, --tiny 2)")
    p.add_argument("--search-fill", choices=("synthetic", "prefill"), default="synthetic",
                   help="how each try of the batch search fills the cache to --context: synthetic writes random\n"
                        "keys and values into it (seconds; what must fit is the cache and a decode step), prefill\n"
                        "runs the model's prefill (minutes per try at 32k) (default: %(default)s)")
    p.add_argument("--search-start", type=int, default=None,
                   help="first batch the search tries (default: the smallest of --batches)")
    p.add_argument("--search-only", action="store_true",
                   help="with --find-max-batch: skip the throughput runs at --batches")
    p.add_argument("--cpu-compile", action="store_true",
                   help="on CPU, let generate compile the static caches' decode steps too (inductor; on CUDA it\n"
                        "always does): how much host work compiling removes, measurable without a GPU")
    p.add_argument("--outlier-fraction", type=float, default=0.0,
                   help="spectralkv keeps this share of coordinates as exact outliers (SmolLM2's default\n"
                        "calibration: 0.003; default: %(default)s, none): times the kernels' outlier paths")
    p.add_argument("--position-centring", choices=("rope", "none"), default="rope",
                   help="spectralkv's synthetic keys are centred on a pre-RoPE mean rotated to each position, as\n"
                        "calibrations of RoPE models are by default (the K_POS kernel variant), or on one mean\n"
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench_results"), help="output folder (default: %(default)s)")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        p.error("--device cpu needs --tiny: the 8B-shaped model is a GPU benchmark (the CPU path checks the logic)")
    preset = TINY_RUN if args.tiny else FULL_RUN
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.dtype is None:
        args.dtype = "float16" if args.device == "cuda" else "float32"
    if not 0 <= args.outlier_fraction < 1:
        p.error(f"--outlier-fraction must be in [0, 1), got {args.outlier_fraction}")
    if args.new_tokens < 2:
        p.error(f"--new-tokens must be >= 2 (decode speed is measured after the first token), got {args.new_tokens}")
    if args.search_new_tokens < 2:
        p.error(f"--search-new-tokens must be >= 2, got {args.search_new_tokens}")
    for name in ("batches", "bits", "flush_blocks"):
        bad = [v for v in getattr(args, name) if v <= 0]
        if bad:
            p.error(f"--{name.replace('_', '-')} must be positive, got {bad}")
    for name in ("window", "sinks", "warmup_tokens", "prefill_chunk"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.search_start is not None and args.search_start < 1:
        p.error(f"--search-start must be >= 1, got {args.search_start}")
    if args.search_only and not args.find_max_batch:
        p.error("--search-only needs --find-max-batch")
    if args.max_batch_limit < 1:
        p.error(f"--max-batch-limit must be >= 1, got {args.max_batch_limit}")
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers must be >= 1, got {args.layers}")
    if set(SKV_METHODS) & set(args.methods) and args.context <= args.window + args.sinks:
        p.error(f"--context ({args.context}) must exceed --window + --sinks ({args.window + args.sinks}), or "
                "spectralkv compresses nothing")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Model and calibration
# ---------------------------------------------------------------------------------------------------------------
def model_shape(args: argparse.Namespace) -> dict[str, int]:
    shape = dict(TINY if args.tiny else LLAMA_8B)
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    if args.vocab is not None:
        shape["vocab_size"] = args.vocab
    return shape


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """A random-weight Llama of :func:`model_shape`, created on the target device (no host copy of 16 GB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = model_shape(args)
    config = LlamaConfig(**shape, max_position_embeddings=max(8192, 2 * (args.context + args.new_tokens)),
                         rope_theta=500000.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = model.to(args.device).eval()  # no-op when created in place
    model.config.spectralkv_base_model = "random-llama-" + ("tiny" if args.tiny else "8b-shape")
    model.generation_config.pad_token_id = 0
    return model


def synthetic_calibration(model: torch.nn.Module, bits: float, window: int, sinks: int, seed: int = 0,
                          outlier_fraction: float = 0.0, position_centring: str = "none",
                          scale_format: str = "log8") -> Any:
    """A valid :class:`SpectralKVConfig` for ``model`` without text or forward passes.

    Every compressed layer and K/V gets a random orthonormal basis, a log-spaced spectrum (so the allocator gives
    the leading coordinates more bits, as on a real model), unit importance, and codebooks fitted to standard
    Gaussian samples with their measured distortion; the bits come from the library's allocator at ``bits``, as
    :func:`spectralkv.calibrate.calibrate` does. The values only matter for quality, which this benchmark ignores.
    ``outlier_fraction`` > 0 keeps exact outliers (threshold: the Gaussian quantile with that two-sided tail, the
    per-token cap 4x that share, as a calibration sets them), so the outlier paths of the write and decode kernels
    are timed; the random fill's keys are not standardised Gaussians, so most of its tokens reach the cap: the
    worst case, which a static cache's buffers pay for anyway. ``position_centring="rope"`` centres the keys on a
    random pre-RoPE mean rotated to each position with the model's own RoPE frequencies, as a RoPE-aware calibration
    does (the decode kernel's ``K_POS`` variant). ``scale_format``: of the per-token scales (``log8``, as
    calibrations write them by default, over 4 octaves; or ``fp16``).
    """
    from spectralkv.allocation import allocate
    from spectralkv.codebook import distortion_table, fit_codebooks
    from spectralkv.config import KINDS, ROPE_FREQUENCIES, SpectralKVConfig, tensor_name
    from spectralkv.fingerprint import compressed_layers, fingerprint
    from spectralkv.positions import ROPE, model_rope_frequencies

    if position_centring not in (ROPE, "none"):
        raise ValueError(f"position_centring must be 'rope' or 'none', got {position_centring!r}.")
    fp = fingerprint(model)
    layers = compressed_layers(fp)
    h, d = fp["num_key_value_heads"], fp["head_dim"]
    g = torch.Generator().manual_seed(seed)
    table = fit_codebooks(torch.randn(8192, generator=g))
    z = torch.randn(h, 1024, d, generator=g)
    z = z / z.pow(2).mean(-1, keepdim=True).sqrt()  # per-token scaled, as the cache codes them
    distortion = distortion_table(z, table).float()  # [H, D, 9]
    eig = torch.logspace(1, -2, d).expand(h, d).contiguous()
    tensors: dict[str, torch.Tensor] = {}
    for l in layers:
        for kind in KINDS:
            tensors[tensor_name(l, kind, "mean")] = torch.zeros(h, d)
            tensors[tensor_name(l, kind, "basis")] = torch.linalg.qr(torch.randn(h, d, d, generator=g)).Q.contiguous()
            tensors[tensor_name(l, kind, "eigenvalues")] = eig.clone()
            tensors[tensor_name(l, kind, "weights")] = torch.ones(h, d)
            tensors[tensor_name(l, kind, "distortion")] = distortion.clone()
            tensors[tensor_name(l, kind, "codebooks")] = table.clone()
            tensors[tensor_name(l, kind, "bits")] = torch.zeros(h, d, dtype=torch.uint8)
            if scale_format == "log8":
                tensors[tensor_name(l, kind, "scale_range")] = torch.tensor([-2.0, 2.0])
        if position_centring == ROPE:
            tensors[tensor_name(l, "k", "position_mean")] = torch.randn(h, d, generator=g)
    if position_centring == ROPE:
        tensors[ROPE_FREQUENCIES] = model_rope_frequencies(model, d).float()
    threshold = None
    if outlier_fraction > 0:
        threshold = float(-torch.special.ndtri(torch.tensor(outlier_fraction / 2, dtype=torch.float64)))
    cfg = SpectralKVConfig(base_model=model.config.spectralkv_base_model, fingerprint=fp, compressed_layers=layers,
                           tensors=tensors, default_bits=bits, token_scale=True, scale_format=scale_format,
                           sink_tokens=sinks, window=window,
                           outlier_threshold=threshold, outlier_fraction=outlier_fraction if threshold else 0.0,
                           position_centring=position_centring if position_centring == ROPE else None,
                           calibration={"source": "synthetic (scripts/bench_generate.py): random bases, no text"})
    for key, b in allocate(cfg.weighted_distortion(), cfg.code_bits_for(bits), cfg.group_size).items():
        tensors[tensor_name(*key, "bits")] = b
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# One generate
# ---------------------------------------------------------------------------------------------------------------
FILL_CHUNK = 4096  # tokens per layer written at once by the synthetic fill (bounds its temporary memory)


def filled_cache(model: torch.nn.Module, method: str, batch: int, tokens: int, capacity: int, cfg: Any,
                 args: argparse.Namespace, flush_block: int = 1) -> Any:
    """The cache ``method`` would hold after a prefill of ``tokens`` tokens, filled with random keys and values
    (``capacity``: the most tokens it will hold, what a static cache preallocates).

    For the batch search: what must fit to serve a batch is its cache and a decode step (servers prefill sequence by
    sequence or in chunks), and a real prefill of a hundred sequences x 32k on an 8B model costs minutes per try.
    spectralkv's tokens go through its write path (rotate, quantize, pack) like a prefill's, without the decoded
    full-precision copy ``update`` returns; fp16 layers get one tensor each (no ``torch.cat`` growth)."""
    from transformers import DynamicCache, StaticCache

    from spectralkv.fused import FusedSpectralKVCache
    from spectralkv.layer_base import CompressedLayer

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    c = model.config
    if method == "fp16-dynamic":
        cache = DynamicCache(config=c)
    elif method == "fp16-static":
        cache = StaticCache(config=c, max_cache_len=capacity)
    else:
        cache = FusedSpectralKVCache(model, cfg, window=args.window, sink_tokens=args.sinks, flush_block=flush_block)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    step = tokens if method == "fp16-dynamic" else FILL_CHUNK
    for i in range(c.num_hidden_layers):
        layer = cache.layers[i] if i < len(cache.layers) else None
        for t0 in range(0, tokens, step):
            shape = (batch, c.num_key_value_heads, min(step, tokens - t0), c.head_dim)
            k = torch.randn(shape, generator=gen, device=dev, dtype=dtype)
            v = torch.randn(shape, generator=gen, device=dev, dtype=dtype)
            if isinstance(layer, CompressedLayer):
                layer.ingest(k, v)
            else:
                cache.update(k, v, i)
            del k, v
    return cache


class StepTimer:
    """A stopping criterion that never stops and records when each step's token is ready.

    ``generate`` calls it once per generated token, after the forward and the token choice; the first call marks the
    end of the prefill. Synchronising here adds nothing: ``generate`` already waits for every step to check whether
    to stop.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def cache_bytes(cache: Any) -> int:
    """Resident bytes of a generate cache: spectralkv's own report, else the K/V tensors of every layer."""
    report = getattr(cache, "memory_report", None)
    if callable(report):
        return int(report()["resident_bytes"])
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def is_oom(exc: BaseException) -> bool:
    """Out of memory, whichever way it surfaced (the allocator, or cuBLAS failing to get a workspace)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def _free(device: torch.device) -> None:
    """Return freed GPU memory between runs (so each run's peak is its own); a no-op on CPU, where a full
    ``gc.collect`` with transformers loaded costs ~0.2 s and frees nothing that matters."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def generate_once(model: torch.nn.Module, method: str, batch: int, context: int, new_tokens: int,
                  args: argparse.Namespace, cache: Any = None, filled: bool | None = None,
                  capacity: int | None = None) -> dict[str, Any]:
    """One timed ``generate``; the caller attaches/detaches spectralkv. Raises on out-of-memory.

    With ``cache`` generate uses it; ``filled`` (default: whether a cache is given) says it already holds the first
    ``context - 1`` tokens (see :func:`filled_cache`), so generate runs only the prompt's last token before decoding:
    ``prefill_s`` is then that one step. ``capacity``: what ``fp16-static`` preallocates (default: this call's
    prompt + new tokens - 1, as generate sizes it)."""
    from transformers import StoppingCriteriaList

    from spectralkv.compat import cache_kwarg

    dev = torch.device(args.device)
    vocab = model.config.vocab_size
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    filled = cache is not None if filled is None else filled
    ids = torch.randint(3, vocab, (batch, context), device=dev, generator=gen)
    mask = torch.ones_like(ids)
    timer = StepTimer(dev)
    kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  return_dict_in_generate=True, stopping_criteria=StoppingCriteriaList([timer]),
                                  pad_token_id=0)
    if cache is not None:
        kwargs[cache_kwarg(model)] = cache
    elif method == "fp16-static":
        kwargs["cache_implementation"] = "static"
        if capacity is not None:  # the warm-up sized for the timed run: generate reuses the same cache (shapes,
            kwargs["max_cache_len"] = capacity  # addresses), so the warm-up pays the compilation, not the timed run
    if args.prefill_chunk and not filled:
        kwargs["prefill_chunk_size"] = args.prefill_chunk
    if getattr(args, "cpu_compile", False) and dev.type == "cpu" and method in ("fp16-static", "spectralkv-static"):
        from transformers import CompileConfig

        kwargs["compile_config"] = CompileConfig()
        kwargs["compile_config"]._compile_all_devices = True  # generate compiles on accelerators only, unless told
    _free(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    end = time.perf_counter()
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None) or cache
    generated = out.sequences.shape[1] - context
    row = dict(
        method=method, batch=batch, context=context, new_tokens=generated,
        prefill_s=timer.times[0] - start, decode_s=end - timer.times[0], total_s=end - start,
        cache_bytes=cache_bytes(cache), cache_type=type(cache).__name__,
        peak_mem_gb=torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else float("nan"),
    )
    row["decode_tok_s"] = batch * (generated - 1) / row["decode_s"] if row["decode_s"] > 0 else float("nan")
    row["prefill_tok_s"] = batch * context / row["prefill_s"] if not filled else float("nan")
    report = getattr(cache, "memory_report", None)
    row["compressed_tokens"] = report()["compressed_tokens"] if callable(report) else 0
    row["fused_backend"] = ""
    if getattr(cache, "backend", None) is not None:  # a fused spectralkv cache: did decode run the Triton kernel?
        from spectralkv.fused import use_triton

        row["fused_backend"] = "triton" if use_triton(cache.backend, dev) else "torch reference"
    del out, cache, ids, mask
    _free(dev)
    return row


class Runner:
    """Runs each method on one model: attaches spectralkv when needed, warms up once per method and budget."""

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace) -> None:
        self.model = model
        self.args = args
        self.calibrations: dict[float, Any] = {}
        self.warm: set[tuple[str, float | None, int]] = set()

    def calibration(self, bits: float) -> Any:
        if bits not in self.calibrations:
            self.calibrations[bits] = synthetic_calibration(self.model, bits, self.args.window, self.args.sinks,
                                                            self.args.seed, self.args.outlier_fraction,
                                                            self.args.position_centring)
        return self.calibrations[bits]

    def run(self, method: str, bits: float | None, batch: int, new_tokens: int, fill: bool = False,
            flush_block: int = 1) -> dict[str, Any]:
        """One ``generate`` at ``--context``; ``fill``: from a synthetically filled cache (no prefill, no warm-up:
        the batch search asks what fits, not how fast)."""
        from spectralkv import attach, detach
        from spectralkv.layer_base import FLUSH_CHUNK

        args = self.args
        if method == "spectralkv-static":
            if fill:
                raise ValueError("the batch search fills growing caches; spectralkv-static preallocates what "
                                 "spectralkv holds (search that one)")
            return self._run_static(bits, batch, new_tokens)
        cfg = self.calibration(bits) if method == "spectralkv" else None
        if cfg is not None:
            attach(self.model, cfg, fused=True, window=args.window, sink_tokens=args.sinks, flush_block=flush_block)
        try:
            if fill:
                # the prompt's last token and all but the last generated one join it, as after a real prefill
                cache = filled_cache(self.model, method, batch, args.context - 1, args.context + new_tokens - 1,
                                     cfg, args, flush_block)
                row = generate_once(self.model, method, batch, args.context, new_tokens, args, cache=cache)
                del cache
                row["note"] = "cache filled with random tokens (no prefill)"
            else:
                capacity = args.context + new_tokens - 1  # the timed run's, in its warm-up too
                key = (method, bits, batch, flush_block)
                if args.warmup_tokens and key not in self.warm:
                    # long enough for two full prefill flush chunks and a ragged one, so the Triton write kernel is
                    # compiled for every token count the real prefill uses, and the timed prefill compiles nothing
                    short = min(args.context, 2 * FLUSH_CHUNK + args.window + args.sinks + 8)
                    generate_once(self.model, method, batch, short, max(2, args.warmup_tokens), args,
                                  capacity=capacity)
                    self.warm.add(key)
                row = generate_once(self.model, method, batch, args.context, new_tokens, args, capacity=capacity)
            row["attn_implementation"] = self.model.config._attn_implementation  # as it ran (attached or not)
        finally:
            detach(self.model)
        row["bits"] = bits if bits is not None else float(torch.finfo(getattr(torch, args.dtype)).bits)
        row["flush_block"] = flush_block
        return row

    def _run_static(self, bits: float, batch: int, new_tokens: int) -> dict[str, Any]:
        """spectralkv-static: one preallocated cache per budget and batch, warmed up (compiled) with a short prompt,
        reset, then timed, so the timed run reuses the compiled step and its CUDA graph (same shapes, same buffers)."""
        from spectralkv.fused import enable_fused
        from spectralkv.static import StaticSpectralKVCache

        args = self.args
        previous = enable_fused(self.model)
        try:
            cache = StaticSpectralKVCache(self.model, self.calibration(bits), max_cache_len=args.context + new_tokens,
                                          window=args.window, sink_tokens=args.sinks)
            if args.warmup_tokens:
                short = min(args.context, args.window + args.sinks + 8)
                warm = min(new_tokens, max(2, args.warmup_tokens))
                generate_once(self.model, "spectralkv-static", batch, short, warm, args, cache=cache, filled=False)
                with torch.inference_mode():  # the buffers were made inside generate_once's inference mode
                    cache.reset()
            row = generate_once(self.model, "spectralkv-static", batch, args.context, new_tokens, args, cache=cache,
                                filled=False)
            row["attn_implementation"] = self.model.config._attn_implementation
            config = self.model.generation_config
            if args.cpu_compile:
                from transformers import CompileConfig

                config = copy.copy(config)
                config.compile_config = CompileConfig()
                config.compile_config._compile_all_devices = True
            compiled = self.model._valid_auto_compile_criteria({"cache": cache}, config)
            row["note"] = "compiled decode step" if compiled else "eager decode steps (generate compiles on CUDA)"
        finally:
            self.model.set_attn_implementation(previous)
        row["bits"], row["flush_block"] = bits, 1
        return row


# ---------------------------------------------------------------------------------------------------------------
# Batch search, derived columns, targets (pure: tested without a model)
# ---------------------------------------------------------------------------------------------------------------
def find_max_batch(fits: Callable[[int], bool], limit: int, start: int = 1) -> tuple[int, bool]:
    """Largest batch in ``[start, limit]`` for which ``fits`` holds, assuming it holds below any batch that fits.

    Doubles from ``start`` until a failure (or ``limit``), then bisects between the last success and the first
    failure (below ``start`` when ``start`` itself does not fit). Returns ``(batch, reached_limit)``; batch 0 when
    not even 1 fits.
    """
    lo, hi, b = 0, None, max(1, start)
    while True:
        if fits(b):
            lo = b
            if b >= limit:
                return lo, True
            b = min(2 * b, limit)
        else:
            hi = b
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Fill ``speedup_vs_fp16`` (vs fp16-dynamic), ``speedup_vs_best_fp16`` and ``baseline`` in place.

    Only throughput rows of the same batch and context are compared (decode tokens/s); NaN where a side is missing.
    """
    by_key: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r.get("mode", "throughput") == "throughput" and r["method"] in FP16_METHODS and is_finite(r["decode_tok_s"]):
            by_key.setdefault((r["batch"], r["context"]), {})[r["method"]] = r
    for r in rows:
        r["speedup_vs_fp16"] = r["speedup_vs_best_fp16"] = float("nan")
        r["baseline"] = ""
        fp = by_key.get((r["batch"], r["context"]), {})
        if r.get("mode", "throughput") != "throughput" or r["method"] in FP16_METHODS or not fp \
                or not is_finite(r["decode_tok_s"]):
            continue
        if "fp16-dynamic" in fp:
            r["speedup_vs_fp16"] = r["decode_tok_s"] / fp["fp16-dynamic"]["decode_tok_s"]
        best = max(fp.values(), key=lambda x: x["decode_tok_s"])
        r["speedup_vs_best_fp16"] = r["decode_tok_s"] / best["decode_tok_s"]
        r["baseline"] = best["method"]


def check_targets(rows: list[dict[str, Any]], target: float = TARGET_SPEEDUP) -> list[dict[str, Any]]:
    """PASS/FAIL of decode speedup >= ``target`` for every spectralkv throughput row, against fp16-dynamic and
    against the best fp16 method; NOT MEASURED when there is no spectralkv or fp16 row to compare."""
    out = []
    skv = [r for r in rows if r.get("mode", "throughput") == "throughput" and r["method"] in SKV_METHODS]
    for r in skv:
        pairs = [("speedup_vs_fp16", "fp16-dynamic")]
        if r["baseline"] != "fp16-dynamic":  # the best fp16 is another method: check against it too
            pairs.append(("speedup_vs_best_fp16", f"best fp16 ({r['baseline'] or 'none measured'})"))
        for column, against in pairs:
            value = r[column]
            status = ("PASS" if value >= target else "FAIL") if is_finite(value) else "NOT MEASURED"
            out.append(dict(batch=r["batch"], context=r["context"], bits=r["bits"], against=against, value=value,
                            threshold=target, status=status, flush_block=int(r.get("flush_block") or 1),
                            method=r["method"]))
    if not skv:
        out.append(dict(batch=None, context=None, bits=None, against="fp16", value=float("nan"), threshold=target,
                        status="NOT MEASURED"))
    return out


def format_targets(results: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        flush = f", flush {r['flush_block']}" if r.get("flush_block", 1) > 1 else ""
        method = f"{r['method']}, " if r.get("method", "spectralkv") != "spectralkv" else ""
        where = "" if r["batch"] is None else \
            f" ({method}batch {r['batch']}, ctx {r['context']}, {r['bits']:g} bit{flush})"
        value = f"{r['value']:.2f}x" if is_finite(r["value"]) else "n/a"
        lines.append(f"{r['status']:12s} decode speedup vs {r['against']}{where}: {value} "
                     f"(target >= {r['threshold']:g}x)")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------
def _label(r: dict[str, Any]) -> str:
    if r["method"] not in SKV_METHODS:
        return r["method"]
    flush = int(r.get("flush_block") or 1)
    return f"{r['method']} {r['bits']:g} bit" + (f", flush {flush}" if flush > 1 else "")


def _note(r: dict[str, Any]) -> str:
    parts = [f"fused decode: {r['fused_backend']}" if r.get("fused_backend") else "", r.get("note", "")]
    return "; ".join(p for p in parts if p)


def write_markdown(rows: list[dict[str, Any]], path: Path, meta: dict[str, Any], command: str,
                   target_lines: list[str]) -> None:
    """Tables with their provenance, ready to paste into the README."""
    lines = [
        "### End-to-end generate", "",
        f"- Device: {meta['gpu']}",
        f"- Date: {meta['timestamp']}",
        f"- Command: `{command}`",
        f"- Model: random-weight Llama, {meta['model']}, {meta['dtype']}; spectralkv window {meta['window']}, "
        f"{meta['sinks']} sinks, fused decode attention",
        f"- Versions: spectralkv {meta['spectralkv']}, torch {meta['torch']}, transformers {meta['transformers']}",
        "",
    ]
    thr = [r for r in rows if r["mode"] == "throughput"]
    if thr:
        lines += [
            "| method | batch | context | new tokens | prefill (s) | decode tok/s | speedup vs fp16-dynamic | "
            "speedup vs best fp16 | peak memory (GB) | KV cache (MB) | note |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in thr:
            lines.append(
                f"| {_label(r)} | {r['batch']} | {r['context']} | {r['new_tokens']} | {fmt(r['prefill_s'], '.2f')} | "
                f"{fmt(r['decode_tok_s'], '.1f')} | {fmt(r['speedup_vs_fp16'], '.2f')} | "
                f"{fmt(r['speedup_vs_best_fp16'], '.2f')} | {fmt(r['peak_mem_gb'], '.1f')} | "
                f"{r['cache_bytes'] / 1e6:.2f} | {_note(r)} |")
        lines.append("")
    mb = [r for r in rows if r["mode"] == "max_batch"]
    if mb:
        lines += [
            "| method | context | largest batch that fits | decode tok/s at that batch | peak memory (GB) | note |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in mb:
            lines.append(f"| {_label(r)} | {r['context']} | {r['max_batch']} | {fmt(r.get('decode_tok_s'), '.1f')} "
                         f"| {fmt(r.get('peak_mem_gb'), '.1f')} | {r.get('note', '')} |")
        lines.append("")
    lines += [f"Target (decode tokens/s >= {TARGET_SPEEDUP:g}x fp16):", ""] + [f"- {t}" for t in target_lines]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thr = [r for r in rows if r["mode"] == "throughput"]
    mb = [r for r in rows if r["mode"] == "max_batch"]
    panels = 1 + bool(mb)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    labels = list(dict.fromkeys(_label(r) for r in thr))
    batches = sorted({r["batch"] for r in thr})
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        ys = [next((r["decode_tok_s"] for r in thr if _label(r) == label and r["batch"] == b), float("nan"))
              for b in batches]
        ax.bar([j + i * width for j in range(len(batches))], ys, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set(ylabel="decode tokens/s", title=f"generate, context {thr[0]['context'] if thr else '?'}")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    if mb:
        ax2 = axes[0][1]
        ax2.bar([_label(r) for r in mb], [r["max_batch"] for r in mb])
        ax2.set(ylabel="largest batch that fits", title=f"context {mb[0]['context']}")
        ax2.tick_params(axis="x", labelrotation=20, labelsize=7)
        ax2.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_row(r: dict[str, Any], device: str) -> None:
    print(f"{_label(r):30s} batch={r['batch']:<4d} ctx={r['context']:<7d} prefill {r['prefill_s']:8.2f} s  "
          f"decode {r['decode_tok_s']:10.1f} tok/s  peak {fmt(r['peak_mem_gb'], '.1f')} GB  "
          f"KV {r['cache_bytes'] / 1e6:.2f} MB  {_note(r)}", flush=True)
    if r.get("fused_backend") == "torch reference" and device == "cuda":
        print("  WARNING: spectralkv decoded with the PyTorch reference, not the Triton kernel: this is not the fused "
              "speed (see the RuntimeWarning above)", flush=True)


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every throughput run, then (with ``--find-max-batch``) the batch search: the rows of the report."""
    model = build_model(args)
    runner = Runner(model, args)
    cases = [(m, None, 1) for m in FP16_METHODS if m in args.methods]
    cases += [("spectralkv", b, f) for b in args.bits for f in args.flush_blocks if "spectralkv" in args.methods]
    cases += [("spectralkv-static", b, 1) for b in args.bits if "spectralkv-static" in args.methods]
    rows: list[dict[str, Any]] = []
    for batch in [] if args.search_only else args.batches:
        for method, bits, flush in cases:
            row = None
            try:
                row = runner.run(method, bits, batch, args.new_tokens, flush_block=flush)
            except Exception as exc:
                if not is_oom(exc):
                    raise
            if row is None:  # out of memory; freed here, once the exception and its frames are gone
                _free(torch.device(args.device))
                nan = float("nan")
                row = dict(method=method, bits=bits if bits is not None else 16.0, batch=batch, context=args.context,
                           new_tokens=0, prefill_s=nan, decode_s=nan, decode_tok_s=nan, prefill_tok_s=nan,
                           peak_mem_gb=nan, cache_bytes=0, cache_type="", flush_block=flush, note="out of memory")
            row.update(mode="throughput", max_batch="")
            row.setdefault("note", "")
            rows.append(row)
            _print_row(row, args.device)
    if args.find_max_batch:
        # memory does not depend on the flush block (a few window tokens): one search per method and budget
        searched = [c for c in cases if c[0] == "spectralkv" and c[2] == args.flush_blocks[0] or c[0] in FP16_METHODS]
        for method, bits, flush in searched:
            last: dict[int, dict[str, Any]] = {}

            def fits(batch: int, method: str = method, bits: float | None = bits, flush: int = flush,
                     last: dict[int, dict[str, Any]] = last) -> bool:
                oom = False
                try:
                    last[batch] = runner.run(method, bits, batch, args.search_new_tokens,
                                             fill=args.search_fill == "synthetic", flush_block=flush)
                except Exception as exc:
                    if not is_oom(exc):
                        raise
                    oom = True
                _free(torch.device(args.device))
                print(f"  {method} {bits or ''} batch {batch}: {'out of memory' if oom else 'fits'}", flush=True)
                return not oom

            start = args.search_start or min(args.batches)
            best, at_limit = find_max_batch(fits, args.max_batch_limit, start=min(start, args.max_batch_limit))
            notes = [last.get(best, {}).get("note", "")]
            notes.append(f"search stopped at --max-batch-limit {args.max_batch_limit}" if at_limit else "")
            row = dict(last.get(best, {}), method=method, bits=bits if bits is not None else 16.0, batch=best,
                       context=args.context, mode="max_batch", max_batch=best, note="; ".join(n for n in notes if n))
            row.setdefault("decode_tok_s", float("nan"))
            rows.append(row)
            print(f"{_label(row):30s} largest batch at ctx {args.context}: {best}{' (limit)' if at_limit else ''}",
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_generate.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured. "
              "For a logic check on CPU run it with --device cpu --tiny.", file=sys.stderr)
        return 2
    import transformers

    import spectralkv

    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "scripts/bench_generate.py", *argv])
    shape = model_shape(args)
    meta = dict(
        gpu=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        model=", ".join(f"{k}={v}" for k, v in shape.items()), dtype=args.dtype, window=args.window,
        sinks=args.sinks, prefill_chunk=args.prefill_chunk, spectralkv=spectralkv.__version__,
        torch=torch.__version__, transformers=transformers.__version__,
    )
    threads = torch.get_num_threads()
    if args.device == "cpu":
        torch.set_num_threads(1)  # the toy model's matmuls are too small to share; the thread pool only adds waits
    try:
        rows = measure(args)
    finally:
        torch.set_num_threads(threads)
    add_speedups(rows)
    target_lines = format_targets(check_targets(rows))
    for r in rows:
        r.update(meta)
    csv_path, md_path, png_path = (args.out / f"bench_generate.{ext}" for ext in ("csv", "md", "png"))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    write_markdown(rows, md_path, meta, command, target_lines)
    plot(rows, png_path)
    print(f"\nTarget (decode tokens/s >= {TARGET_SPEEDUP:g}x fp16):")
    for line in target_lines:
        print("  " + line)
    print(f"wrote {csv_path}, {md_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
