"""Command-line front end of the harness: ``add_eval_arguments(parser)`` + ``run_from_args(args)``.

Used by ``scripts/evaluate.py`` and meant for a ``spectralkv eval`` subcommand::

    spectralkv eval --calibration artifacts/smollm2-skv --bits 2 2.5 3 4 \\
        --methods fp16 spectralkv kivi turboquant hf-quantized --plot
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .methods import METHODS
from .perplexity import PerplexitySettings
from .runner import DEFAULT_BUDGETS, DEFAULT_HF_BUDGETS, TASKS, EvalSettings, run_evaluation, write_outputs


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the harness's options to ``parser`` (returned for chaining)."""
    parser.add_argument("--model", default=None,
                        help="model folder or Hub id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    parser.add_argument("--calibration", default=None, metavar="DIR",
                        help="calibration folder or Hub id; a folder that does not exist yet is created by "
                             "calibrating the model (needed by the spectralkv method)")
    parser.add_argument("--calibration-bits", type=float, default=3.0,
                        help="budget a new calibration is made for (default: 3.0)")
    parser.add_argument("--bits", type=float, nargs="+", default=list(DEFAULT_BUDGETS),
                        help="budgets: spectralkv all-in bits/coord; kivi/turboquant code bits (default: 2 2.5 3 4)")
    parser.add_argument("--hf-bits", nargs="+", default=[f"{b:g}" for b in DEFAULT_HF_BUDGETS], metavar="BITS",
                        help="budgets for transformers' QuantizedCache hqq/quanto backends, or 'all' for every "
                             "--bits (default: 4; fp8 always runs once; at 2-3 bits they lose 17-755%% here and "
                             "each run costs two fp16 runs)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="methods to compare (fp16, the reference, always runs)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks to run")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (numbers are noisy)")
    parser.add_argument("--out", default="artifacts/eval", help="output folder (default: artifacts/eval)")
    parser.add_argument("--json", action="store_true", help="print the JSON results instead of the Markdown table")
    parser.add_argument("--plot", action="store_true", help="also write pareto.png")
    parser.add_argument("--windows", type=int, default=None, help="perplexity windows")
    parser.add_argument("--prefill", type=int, default=None, help="perplexity prefill tokens per window")
    parser.add_argument("--decode", type=int, default=None, help="scored decode steps per window")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per batch")
    parser.add_argument("--needle-context", type=int, default=None, help="needle context tokens")
    parser.add_argument("--window", type=int, default=32, help="full-precision recent window (default: 32)")
    parser.add_argument("--sink-tokens", type=int, default=4, help="full-precision leading tokens (default: 4)")
    parser.add_argument("--text", default="pydoc", help="evaluation text: 'pydoc' or a UTF-8 file")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def hf_budgets_from_args(args: argparse.Namespace) -> list[float] | None:
    """``--hf-bits``: ``None`` for 'all' (every ``--bits``), else the numbers given."""
    values = [str(v) for v in args.hf_bits]
    if [v.lower() for v in values] == ["all"]:
        return None
    try:
        return [float(v) for v in values]
    except ValueError:
        raise SystemExit(f"--hf-bits takes numbers or 'all', got {' '.join(values)}.") from None


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    s = EvalSettings.quick() if args.quick else EvalSettings()
    s.window, s.sink_tokens, s.text = args.window, args.sink_tokens, args.text
    p = s.perplexity
    for name in ("windows", "prefill", "decode", "batch_size"):
        value = getattr(args, name)
        if value is not None:
            setattr(p, name, value)
    p.__post_init__()
    if args.prefill is not None:
        s.fidelity.prefill = args.prefill
    if args.needle_context is not None:
        s.needle.context_tokens = args.needle_context
    s.needle.__post_init__()
    s.__post_init__()
    return s


def add_perplexity_arguments(parser: argparse.ArgumentParser) -> None:
    """``--windows --prefill --decode --batch-size`` with the harness's defaults, for scripts that run only the
    streaming perplexity (the side studies in scripts/)."""
    d = PerplexitySettings()
    parser.add_argument("--windows", type=int, default=d.windows, help="perplexity windows (default: %(default)s)")
    parser.add_argument("--prefill", type=int, default=d.prefill, help="prefill per window (default: %(default)s)")
    parser.add_argument("--decode", type=int, default=d.decode, help="scored decode steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per batch (default: %(default)s)")


def perplexity_settings_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> PerplexitySettings:
    """The settings :func:`add_perplexity_arguments` parsed; a bad value is a usage error naming the option."""
    try:
        return PerplexitySettings(prefill=args.prefill, decode=args.decode, windows=args.windows,
                                  batch_size=args.batch_size)
    except ValueError as e:
        parser.error(f"{e} (--windows, --prefill, --decode and --batch-size must be >= 1)")


def _is_existing_or_hub(name: str) -> bool:
    """True for an existing folder or something shaped like a Hub id (``org/name`` with no such local parent);
    False for a local path to create."""
    path = Path(name).expanduser()
    if path.is_dir():
        return True
    local = name.startswith((".", "/", "~")) or name.count("/") != 1 or path.parent.is_dir()
    return not local


def load_or_calibrate(args: argparse.Namespace, model: Any, tokenizer: Any) -> Any:
    """The calibration named by ``--calibration`` (made and saved there when the folder does not exist)."""
    from ..config import SpectralKVConfig

    if args.calibration and _is_existing_or_hub(args.calibration):
        return SpectralKVConfig.from_pretrained(args.calibration, model=model)
    from ..calibrate import calibrate

    kwargs: dict[str, Any] = {"tokens": 4096, "heldout_tokens": 1024} if args.quick else {}
    print(f"Calibrating the model at {args.calibration_bits} bits{' (quick)' if args.quick else ''}...",
          file=sys.stderr)
    cfg = calibrate(model, tokenizer, bits=args.calibration_bits, progress=not args.no_progress, **kwargs)
    if args.calibration:
        cfg.save_pretrained(args.calibration)
        print(f"Saved the calibration to {args.calibration}", file=sys.stderr)
    return cfg


def run_from_args(args: argparse.Namespace) -> int:
    """Load the model (and calibration), run the harness, write the outputs, print the table (or JSON)."""
    import torch

    from ..models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    hf_budgets = hf_budgets_from_args(args)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, args.gguf_file)
    calibration = None
    if "spectralkv" in args.methods:
        calibration = load_or_calibrate(args, model, tokenizer)
    load_s = time.perf_counter() - t0
    results = run_evaluation(model, tokenizer, methods=args.methods, budgets=args.bits, calibration=calibration,
                             settings=settings, tasks=args.tasks, hf_budgets=hf_budgets, progress=not args.no_progress)
    results["timings"]["load_and_calibration_s"] = load_s
    results["timings"]["total_s"] = time.perf_counter() - t0
    paths = write_outputs(results, args.out, plot=args.plot)
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
        print((Path(paths["markdown"])).read_text(encoding="utf-8"))
        print("Wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare spectralkv with baselines on one model.")
    add_eval_arguments(parser)
    return run_from_args(parser.parse_args(argv))
