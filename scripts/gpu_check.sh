#!/usr/bin/env bash
# One prepared run for a lent CUDA GPU (a 15-minute lease fits it): the kernel tests compiled on the GPU, then the
# decode and generate benchmarks. Runs on the machine's own torch/Triton (no set-up, no network); the package is
# copied from this checkout into a temporary site folder, and transformers comes from carried wheels when the
# machine's is older than the package needs (make them here with `scripts/gpu_check.sh --wheels`, carry `.whl`).
#
#   scripts/gpu_check.sh [STAGE...]     stages: tests decode outliers modes generate compiled maxbatch
#                                       (default: all but compiled and maxbatch, under 10 minutes; then
#                                       a second call `compiled` (up to 5) and, if time is left, `maxbatch` (up to 7))
#   scripts/gpu_check.sh --wheels       (on this machine) download the wheels the GPU machine lacks into .whl/
#
# Every stage has its own time limit and a failed stage does not stop the next one; $OUT (default
# bench_results/gpu) gets gpu_check.log (environment, each stage's output and exit status), results.md (every
# benchmark's Markdown table), and the decode and generate CSVs and plots: 6 files (the device tool brings back 8).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TRANSFORMERS_MIN="5.24"
GPU_CHECK_ALLOW_CPU="${GPU_CHECK_ALLOW_CPU:-0}"

if [ "${1:-}" = "--wheels" ]; then
  # pure-Python wheels only (the GPU machine's Python is 3.12; its torch, Triton, tokenizers stay as they are).
  # The oldest transformers the package supports, not this machine's: 5.25 and later need what the image lacks
  # (huggingface_hub >= 2.4, tokenizers 0.23, Hugging Face's kernels package); 5.24 runs on the image's hub 1.33.
  PY="${PYTHON:-.venv/bin/python}"
  mkdir -p .whl
  rm -f .whl/transformers-*.whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "transformers==$TRANSFORMERS_MIN.*"
  ls -l .whl
  exit 0
fi

OUT="${OUT:-bench_results/gpu}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
log() { printf '%s\n' "$*" | tee -a "$LOG"; }

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests decode outliers modes generate)
for s in "${stages[@]}"; do
  case "$s" in tests|decode|outliers|modes|generate|compiled|maxbatch) ;; *)
    echo "unknown stage '$s' (choose from: tests decode outliers modes generate compiled maxbatch)" >&2; exit 2;;
  esac
done

# -- environment: this checkout's package over the machine's own torch and Triton -------------------------------
SITE="$(mktemp -d /tmp/spectralkv-site.XXXX)"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 3
fi
mkdir -p "$SITE/spectralkv"
cp -r src/spectralkv/. "$SITE/spectralkv/"
cp -r kernels "$SITE/spectralkv/kernels"
cp -r hub_cards "$SITE/spectralkv/hub_cards"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_INTERPRET=0
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" - <<EOF
import sys, torch, triton, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__,
      "| transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
from packaging.version import Version
if Version(transformers.__version__) < Version("$TRANSFORMERS_MIN"):
    sys.exit("transformers %s < $TRANSFORMERS_MIN: run 'scripts/gpu_check.sh --wheels' here and carry .whl"
             % transformers.__version__)
import spectralkv, spectralkv.kernels.decode_attention, spectralkv.kernels.encode  # noqa: F401  (compiles nothing)
print("spectralkv", spectralkv.__version__, "from", spectralkv.__file__)
if not torch.cuda.is_available() and "$GPU_CHECK_ALLOW_CPU" != "1":
    sys.exit("gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False); on CPU, 'make test' runs the "
             "kernels under TRITON_INTERPRET=1 (GPU_CHECK_ALLOW_CPU=1 runs this script's plumbing anyway)")
EOF
} 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "environment check failed"; exit 3; }

run_stage() {  # name, seconds, command...
  local name="$1" limit="$2"; shift 2
  log ""
  log "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  log "== $name: exit $rc after $((SECONDS - t0))s"
  status+=("$name=$rc")
}

status=()
BENCH="$OUT/bench"
for s in "${stages[@]}"; do
  case "$s" in
    tests)  # the kernel tests, compiled on the GPU (tests/test_kernels.py moves its cases to CUDA)
      run_stage tests 120 "$PY" -m pytest -q --maxfail=5 -p no:cacheprovider tests/test_kernels.py ;;
    decode)  # per-layer decode attention, Llama-3.1-8B shapes (the README's first benchmark line)
      run_stage decode 160 "$PY" scripts/bench_decode.py --contexts 1k 8k 32k 128k --batches 1 4 16 \
        --bits 2 2.5 3 4 --out "$BENCH/decode" ;;
    outliers)  # the same kernel reading exact outliers at SmolLM2's default share (0.30% of coordinates)
      run_stage outliers 50 "$PY" scripts/bench_decode.py --contexts 32k --batches 1 16 --bits 2.5 4 \
        --outlier-fraction 0.003 --out "$BENCH/outliers" ;;
    modes)  # the kernel's other byte-read and centroid modes at 32k (the decode stage used gather + table), and
      # keys centred on one mean (the decode stage's keys are position-centred, as RoPE calibrations are by default)
      run_stage modes 80 bash -c "'$PY' scripts/bench_decode.py --contexts 32k --batches 1 16 --bits 2.5 4 \
        --methods spectralkv --unpack register --out '$BENCH/register'; '$PY' scripts/bench_decode.py \
        --contexts 32k --batches 1 16 --bits 2.5 4 --methods spectralkv --lookup select --out '$BENCH/select'; \
        '$PY' scripts/bench_decode.py --contexts 32k --batches 1 16 --bits 2.5 4 --methods spectralkv \
        --position-centring none --out '$BENCH/onemean'" ;;
    generate)  # end-to-end generate at batch 8 x 32k on an 8B-shaped random model; flush block 32 writes the
      # store once every 32 steps (64 write-kernel launches per step fewer on 32 layers): does host overhead matter?
      run_stage generate 170 "$PY" scripts/bench_generate.py --batches 8 --context 32k --new-tokens 128 \
        --flush-blocks 1 32 --methods fp16-dynamic fp16-static spectralkv --out "$BENCH/generate" ;;
    compiled)  # the same with the decode step compiled into a CUDA graph: fp16-static vs the static spectralkv cache
      run_stage compiled 300 "$PY" scripts/bench_generate.py --batches 8 --context 32k --new-tokens 128 \
        --methods fp16-static spectralkv-static --out "$BENCH/compiled" ;;
    maxbatch)  # the largest batch whose cache and decode steps fit at 32k, per method (caches filled synthetically)
      run_stage maxbatch 420 "$PY" scripts/bench_generate.py --context 32k --find-max-batch --search-only \
        --search-start 8 --out "$BENCH/maxbatch" ;;
  esac
done

# what comes back: the log, every Markdown table in one file, the decode and generate CSVs and plots
for name in decode outliers register select onemean generate compiled maxbatch; do
  for f in "$BENCH/$name"/*.md; do
    [ -f "$f" ] && { printf '\n## %s\n\n' "$name"; cat "$f"; } >> "$OUT/results.md"
  done
done
for f in "$BENCH"/decode/bench_decode.{csv,png} "$BENCH"/generate/bench_generate.{csv,png}; do
  [ -f "$f" ] && cp "$f" "$OUT/"
done
[ -f "$BENCH/compiled/bench_generate.csv" ] && cp "$BENCH/compiled/bench_generate.csv" "$OUT/compiled_generate.csv"
rm -rf "$BENCH" "$SITE"
log ""
log "stages: ${status[*]}"
for st in "${status[@]}"; do [ "${st##*=}" = 0 ] || exit 1; done
