"""Evaluation harness: every method x budget on the same model, text and settings (kvpress-style).

- :mod:`.methods`: ``make_cache(method, model, bits, ...)`` for fp16, spectralkv, kivi, turboquant, hf-quantized.
- :mod:`.replay`: one exact prefill shared by every method.
- :mod:`.perplexity`: streaming perplexity (prefill, then scored teacher-forced decode over the compressed cache).
- :mod:`.needle`: passkey retrieval at a >= 2k-token context.
- :mod:`.fidelity`: per-layer cosine similarity of attention outputs (real queries).
- :mod:`.runner` / :mod:`.report` / :mod:`.cli`: run everything, write JSON + Markdown + Pareto plot.
"""

from __future__ import annotations

from .cli import add_eval_arguments, run_from_args
from .methods import METHODS, MethodUnavailable, bits_per_coordinate, make_cache, plan_runs
from .runner import EvalSettings, run_evaluation, write_outputs

__all__ = [
    "METHODS",
    "EvalSettings",
    "MethodUnavailable",
    "add_eval_arguments",
    "bits_per_coordinate",
    "make_cache",
    "plan_runs",
    "run_evaluation",
    "run_from_args",
    "write_outputs",
]
