#!/usr/bin/env python
"""Calibrate a model (or take an existing calibration folder), measure it, and publish it to the Hugging Face Hub.

The same as ``spectralkv push`` (see ``--help`` for every option; the logic lives in ``spectralkv.publish``):

    # calibrate the embedded SmolLM2-135M at 3 bits, quick-evaluate at 2/3/4 bits, publish to a new repo
    .venv/bin/python scripts/publish_calibration.py me/smollm2-135m-skv --bits 3

    # publish an existing folder as the "2bit" variant of a shared repo, on a branch, as a pull request
    .venv/bin/python scripts/publish_calibration.py me/smollm2-135m-skv --from artifacts/skv-2bit \\
        --path-in-repo 2bit --revision variants --create-pr

Needs a Hub token with write access (``hf auth login`` or ``HF_TOKEN``). If the upload fails or is interrupted, the
local folder is complete and the exact command that resumes is printed.
"""

from __future__ import annotations

import sys

from spectralkv.cli import main

if __name__ == "__main__":
    sys.exit(main(["push", *sys.argv[1:]]))
