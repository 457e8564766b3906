#!/usr/bin/env python
"""Reproduce the README results table from scratch.

Loads the embedded SmolLM2-135M-Instruct and the calibration in ``artifacts/smollm2-135m-instruct-skv`` (the one
``make run`` writes; made there with the default settings when missing, ~13 min), then runs every method x budget
(2, 2.5, 3, 4) through the harness: streaming perplexity, passkey retrieval and attention fidelity. Writes
``artifacts/eval/{results.json,results.md,pareto.png}`` and prints the table. ``--quick`` runs tiny settings in a
few minutes. See ``--help`` for every option.

    .venv/bin/python scripts/evaluate.py
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spectralkv.evaluation import add_eval_arguments, run_from_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(parser)
    parser.set_defaults(calibration="artifacts/smollm2-135m-instruct-skv", plot=True)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
