# Two entry points: `make run` (calibrate the embedded default model and generate with it) and `make test`.
.PHONY: setup run test lint

setup:
	@bash scripts/setup.sh

run: setup
	HF_HUB_OFFLINE=1 .venv/bin/spectralkv demo

test: setup
	@bash scripts/install_browser.sh
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 .venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check src kernels scripts tests spaces
