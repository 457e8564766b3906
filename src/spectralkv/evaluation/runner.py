"""Run every method x budget in one process, on the same model, text and settings, and write the results.

Outputs (in ``out_dir``): ``results.json`` (everything, including per-window NLL and needle answers),
``results.md`` (the table) and ``pareto.png`` (dPPL vs bits per coordinate, one line per method).
"""

from __future__ import annotations

import datetime
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache

from .. import __version__
from ..text import evaluation_tokens
from .fidelity import FidelitySettings, attention_fidelity
from .methods import METHODS, MethodUnavailable, RunSpec, Skipped, plan_runs, spec_cache_factory
from .needle import NeedleSettings, build_prompts, needle_retrieval
from .perplexity import PerplexitySettings, evaluation_windows, streaming_nll, summarize
from .report import markdown_table, pareto_plot, write_json

TASKS = ("perplexity", "needle", "fidelity")
DEFAULT_BUDGETS = (2.0, 2.5, 3.0, 4.0)
# transformers' QuantizedCache backends by default only at 4 bits (fp8 runs regardless): measured on SmolLM2 they
# lose +17..+755% at 2-3 bits, and each of their runs costs twice an fp16 run (dequantizing every step), which
# alone took the default run over 30 minutes on 2 cores. `hf_budgets=None` (CLI `--hf-bits all`) runs every budget.
DEFAULT_HF_BUDGETS = (4.0,)


@dataclass
class EvalSettings:
    """Everything that defines a harness run (recorded in the results).

    Args:
        perplexity / needle / fidelity: per-task settings.
        window: recent tokens kept in full precision by every ``CompressedLayer`` method.
        sink_tokens: leading tokens kept in full precision by every ``CompressedLayer`` method.
        text: evaluation text source (``"pydoc"`` or a file); the held-out part is used.
        seed: seed for TurboQuant's rotations (needle and bootstrap seeds live in their settings).
        decode_cache: keep compressed stores decoded between steps (same numbers, much faster on CPU).
    """

    perplexity: PerplexitySettings = field(default_factory=PerplexitySettings)
    needle: NeedleSettings = field(default_factory=NeedleSettings)
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)
    window: int = 32
    sink_tokens: int = 4
    text: str = "pydoc"
    seed: int = 0
    decode_cache: bool = True

    def __post_init__(self) -> None:
        if self.window < 0 or self.sink_tokens < 0:
            raise ValueError(f"`window` and `sink_tokens` must be >= 0, got {self.window} and {self.sink_tokens}.")

    @classmethod
    def quick(cls) -> EvalSettings:
        """Tiny settings for tests and smoke runs (minutes on CPU; differences under ~5% are noise)."""
        return cls(
            perplexity=PerplexitySettings(prefill=96, decode=16, windows=4, batch_size=4, bootstrap=200),
            needle=NeedleSettings(context_tokens=320, depths=(0.3, 0.7), trials=1, batch_size=2),
            fidelity=FidelitySettings(windows=2, prefill=96, decode=8, batch_size=2),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "perplexity": self.perplexity.to_dict(),
            "needle": self.needle.to_dict(),
            "fidelity": self.fidelity.to_dict(),
            "window": self.window,
            "sink_tokens": self.sink_tokens,
            "text": self.text,
            "seed": self.seed,
            "decode_cache": self.decode_cache,
        }


def environment() -> dict[str, Any]:
    import transformers

    return {
        "spectralkv": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def model_name(model: Any) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "spectralkv_base_model", None) or getattr(cfg, "_name_or_path", "") or "model")


def _take(ids: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """``n`` tokens from ``start`` (from the beginning when the rest of the text is too short)."""
    if n > len(ids):
        raise ValueError(f"The evaluation text has {len(ids)} tokens; {n} are needed.")
    return ids[start : start + n] if start + n <= len(ids) else ids[:n]


def run_evaluation(
    model: Any,
    tokenizer: Any,
    *,
    methods: Sequence[str] = METHODS,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    calibration: Any = None,
    settings: EvalSettings | None = None,
    hf_budgets: Sequence[float] | None = DEFAULT_HF_BUDGETS,
    tasks: Sequence[str] = TASKS,
    extra: dict[str, Callable[[], Cache]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``methods`` x ``budgets`` (plus ``fp16``, the reference) on every task in ``tasks``.

    ``hf_budgets``: budgets for transformers' ``QuantizedCache`` backends (``None``: ``budgets``).
    ``extra`` adds cache factories under their own labels (e.g. a deliberately broken method in a test); their
    bits per coordinate are measured like the others'. Returns the results dict that :mod:`.report` renders.
    """
    settings = settings or EvalSettings()
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"Unknown task(s) {bad}; choose from {', '.join(TASKS)}.")
    specs, skipped = plan_runs(methods, budgets, calibration, hf_budgets)
    factories: dict[str, Callable[[], Cache]] = {}
    by_label: dict[str, RunSpec | None] = {}
    for spec in specs:
        try:
            factories[spec.label] = spec_cache_factory(
                spec, model, calibration, window=settings.window, sink_tokens=settings.sink_tokens,
                seed=settings.seed, decode_cache=settings.decode_cache)
            by_label[spec.label] = spec
        except (MethodUnavailable, ValueError, ImportError, RuntimeError) as e:
            skipped.append(Skipped(spec.method if spec.backend is None else f"hf-{spec.backend}", spec.bits, str(e)))
    for label, factory in (extra or {}).items():
        factories[label] = factory
        by_label[label] = None

    ids = evaluation_tokens(tokenizer, settings.text)
    timings: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    for label, spec in by_label.items():
        rows[label] = {"label": label, "method": spec.method if spec else label,
                       "bits": spec.bits if spec else None, "backend": spec.backend if spec else None}
        if spec and spec.method == "spectralkv" and calibration is not None and spec.bits is not None:
            rows[label]["weights_fitted_at_bits"] = calibration.profile_bits(spec.bits)  # which profile served it
    used = 0
    if "perplexity" in tasks:
        ps = settings.perplexity
        windows = evaluation_windows(ids, ps)
        used = windows.numel()
        t0 = time.perf_counter()
        res = streaming_nll(model, windows, factories, prefill=ps.prefill, batch_size=ps.batch_size,
                            progress=progress)
        timings["perplexity_s"] = time.perf_counter() - t0
        timings["perplexity_shared_prefill_s"] = res.prefill_seconds
        timings["perplexity_per_run_s"] = res.seconds
        ref = res.nll.get("fp16")
        for label in factories:
            rows[label]["perplexity"] = summarize(res.nll[label], ref, resamples=ps.bootstrap, seed=ps.seed)
            rows[label]["perplexity"]["prefill_replayed"] = res.replayed[label]
            rows[label]["bits_per_coordinate"] = res.bits[label]
    if "fidelity" in tasks:
        fs = settings.fidelity
        length = fs.prefill + fs.decode
        text = _take(ids, used, fs.windows * length)
        fw = text.view(fs.windows, length)
        used += fw.numel()
        t0 = time.perf_counter()
        fid = attention_fidelity(model, fw, factories, fs, progress=progress)
        timings["fidelity_s"] = time.perf_counter() - t0
        for label in factories:
            rows[label]["fidelity"] = fid[label]
    if "needle" in tasks:
        ns = settings.needle
        haystack = ids[used:] if len(ids) - used >= 2 * ns.context_tokens else ids  # disjoint when there is room
        prompts = build_prompts(tokenizer, haystack, ns)
        t0 = time.perf_counter()
        nres = needle_retrieval(model, tokenizer, prompts, factories, ns, progress=progress)
        timings["needle_s"] = time.perf_counter() - t0
        for label in factories:
            rows[label]["needle"] = nres.summary(label)
    return {
        "model": model_name(model),
        "calibration": None if calibration is None else {
            "base_model": calibration.base_model, "default_bits": calibration.default_bits,
            "token_scale": calibration.token_scale, "key_weight": calibration.key_weight,
            "weight_profiles": [p["bits"] for p in calibration.weight_profiles],
            "calibration": calibration.calibration},
        "methods": list(methods),
        "budgets": [float(b) for b in budgets],
        "hf_budgets": None if hf_budgets is None else [float(b) for b in hf_budgets],
        "tasks": list(tasks),
        "settings": settings.to_dict(),
        "environment": environment(),
        "runs": list(rows.values()),
        "skipped": [{"method": s.method, "bits": s.bits, "reason": s.reason} for s in skipped],
        "timings": timings,
    }


def write_outputs(results: dict[str, Any], out_dir: str | Path, *, plot: bool = True) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and (with ``plot``) ``pareto.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(results, out / "results.json")}
    md = out / "results.md"
    md.write_text(markdown_table(results), encoding="utf-8")
    paths["markdown"] = md
    if plot:
        png = pareto_plot(results, out / "pareto.png")
        if png is not None:
            paths["plot"] = png
    return paths
