#!/usr/bin/env bash
# The one GPU check: environment, every GPU test, the kernel benchmark, the offload benchmark and the engine
# benchmark (and tile tuning for Mixtral bf16 with TUNE=1), in under 10 minutes: each step has its own
# timeout (170 + 140 + 45 + 200 s, plus 220 + 60 s for tuning); a step that hits it is cut, marked TIMEOUT,
# and the script goes on. Ends with a table: each step's status and, for the test steps, pytest's counts.
# Exit status 1 if any step failed, timed out or collected no tests.
#
#   bash bench/gpu_check.sh                 # from the repo root on a CUDA machine
#   OUT=/some/dir bash bench/gpu_check.sh   # also writes env.txt, pytest.txt, tune.txt, the tuned table
#                                           # (tuned_*.json), kernels_bench.md, offload_bench.md and
#                                           # engine_bench.md there (8 files: what the device tool returns)
#   BENCH_ARGS='--shapes mini --m 1,16' bash bench/gpu_check.sh   # a shorter kernel benchmark (16-bit only)
#   TUNE=1 bash bench/gpu_check.sh          # retune kernels/tuned/ for this card first (off by default:
#                                           # H100 and H200 tables are committed)
#   TUNE=1 TUNE_DTYPE=int8_w8a16 TUNE_M=1,2,4,8,16 bash bench/gpu_check.sh   # an 8-bit table instead
#                                           # (int8_w8a16, fp8_w8a16 or fp8_w8a8: none is tuned yet)
#   ENGINE_ARGS='--models mini --graphs on' bash bench/gpu_check.sh   # a shorter engine benchmark
#   OFFLOAD_BENCH=0 ENGINE_BENCH=0 bash bench/gpu_check.sh    # leave those steps out
#
# The lent GPU machine has torch and triton but no network and not every runtime dependency: run
# `bash bench/gpu_wheels.sh` here first, which downloads the missing ones as wheels into .whl/ (git-ignored;
# name it in the device tool's `carry`); step 0 installs them into a temporary folder, never system-wide.
# Nothing is installed from the repository: a shadow tree maps moe_runtime.kernels -> kernels/ and
# moe_runtime.cluster -> cluster/ (pyproject's package-dir mapping) and goes on PYTHONPATH, and
# PYTHONSAFEPATH keeps the repository root (whose kernels/ folder would shadow Hugging Face's `kernels`)
# off sys.path.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUTDIR=${OUT:-}
[ -n "$OUTDIR" ] && mkdir -p "$OUTDIR"
tee_out() { if [ -n "$OUTDIR" ]; then tee "$OUTDIR/$1"; else cat; fi; }
SUMMARY=()
status=0
record() {  # step name, exit code, detail
  local verdict=ok
  case $2 in 0) ;; 124 | 137) verdict=TIMEOUT ;; *) verdict="FAILED (rc $2)" ;; esac
  [ "$2" -eq 0 ] || status=1
  SUMMARY+=("$(printf '%-34s %-16s %s' "$1" "$verdict" "$3")")
}

# pytest step: name, timeout, pytest args. Collection errors and empty selections fail loudly. Every
# step's whole log goes to $OUT/pytest.txt, its last lines to the screen.
pytest_step() {
  local name=$1 limit=$2 log="$TMP/pytest_step.txt"
  shift 2
  echo "== $name: pytest $*"
  timeout "$limit" $PY -m pytest "$@" -p no:cacheprovider -q -rfE >"$log" 2>&1
  local rc=$?
  [ -n "$OUTDIR" ] && { echo "== $name: pytest $*"; cat "$log"; } >>"$OUTDIR/pytest.txt"
  tail -n 25 "$log"
  local counts
  counts=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)' "$log" | tail -n 1 | tr -d '=' | xargs)
  if grep -qE '^ERROR (collecting|tests/)|errors? during collection' "$log"; then
    echo "!!! $name: COLLECTION ERROR: tests did not run (see above)"
    [ "$rc" -eq 0 ] && rc=2
  elif [ "$rc" -eq 5 ]; then
    echo "!!! $name: NO TESTS COLLECTED"
  fi
  record "$name" "$rc" "${counts:-no summary line}"
}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# 0. Carried wheels, if any.
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$TMP/site" .whl/*.whl \
    && export PYTHONPATH="$TMP/site" || echo "warning: the carried wheels did not install"
fi

# 1. Import path: a shadow moe_runtime/ whose entries link to the repo's, plus kernels/ and cluster/.
mkdir -p "$TMP/shadow/moe_runtime"
for entry in moe_runtime/*; do ln -s "$ROOT/$entry" "$TMP/shadow/moe_runtime/"; done
ln -s "$ROOT/kernels" "$TMP/shadow/moe_runtime/kernels"
ln -s "$ROOT/cluster" "$TMP/shadow/moe_runtime/cluster"
export PYTHONPATH="$TMP/shadow${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1
export PYTHONUNBUFFERED=1

# 2. Environment.
{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
  $PY -c "import moe_runtime.kernels as k; print('moe_runtime.kernels from', k.__file__)"
} 2>&1 | tee_out env.txt
RUNTIME_OK=0
if $PY -c "import moe_runtime.engine.llm_engine, moe_runtime.presets.init_model" 2>"$TMP/import.txt"; then
  RUNTIME_OK=1
else
  echo "!!! the runtime does not import here (carry its wheels: bash bench/gpu_wheels.sh):"
  tail -n 3 "$TMP/import.txt"
fi

# 3. GPU tests: every test marked gpu. Without the runtime's dependencies only the kernel tests can run
#    (--noconftest: the suite-wide conftest builds checkpoints), and the step says so.
if [ "$RUNTIME_OK" = 1 ]; then
  pytest_step "pytest -m gpu (whole suite)" 170 -m gpu tests
else
  pytest_step "pytest -m gpu tests/kernels only" 120 -m gpu tests/kernels --noconftest
  record "pytest -m gpu (rest of the suite)" 1 "NOT RUN: the runtime's dependencies are missing"
fi

# 4. Tile tuning for Mixtral-8x7B (bf16, or TUNE_DTYPE) on this GPU: writes kernels/tuned/E=8,N=14336,...json
#    (the benchmark below then uses it, and shows the untuned heuristic beside it).
if [ "${TUNE:-0}" = 1 ]; then
  echo "== bench/tune_fused_moe.py"
  timeout 220 $PY bench/tune_fused_moe.py --shape mixtral --dtype "${TUNE_DTYPE:-bf16}" --budget-s 160 \
    ${TUNE_M:+--m "$TUNE_M"} 2>&1 | tee_out tune.txt
  record "tune_fused_moe (mixtral ${TUNE_DTYPE:-bf16})" "${PIPESTATUS[0]}" ""
  pytest_step "pytest -m gpu -k mixtral (tuned)" 60 -m gpu -k mixtral tests/kernels --noconftest
  if [ -n "$OUTDIR" ]; then  # the table just written; '=' and ',' may not survive a copy back
    f=$(ls -t kernels/tuned/*.json | head -n 1)
    cp "$f" "$OUTDIR/tuned_$(basename "$f" | tr '=,' '__')"
  fi
fi

# 5. Kernel benchmark: Mixtral-8x7B and mini shapes, bf16, and int8 / fp8 experts (w8a16) beside them at
#    M <= 16 with their speedup and % of the quantized-bytes roofline (BENCH_ARGS overrides).
echo "== bench/moe_kernels.py"
# shellcheck disable=SC2086
timeout 140 $PY bench/moe_kernels.py ${BENCH_ARGS:---shapes mixtral,mini --dtype bf16 --repeats 10 --quant none,int8,fp8} \
  ${OUTDIR:+--out "$OUTDIR/kernels_bench.md"}
record "moe_kernels benchmark" $? ""

# 6. Offload on the GPU (pinned host tier, side-stream copies).
if [ "${OFFLOAD_BENCH:-1}" = 1 ] && [ "$RUNTIME_OK" = 1 ]; then
  echo "== bench/offload.py (pinned tier)"
  timeout 45 $PY bench/offload.py --device cuda --tier pinned --models tiny-trained --batches 1,16 --tokens 16 \
    --repeats 2 ${OUTDIR:+--out "$OUTDIR/offload_bench.md"} 2>&1 | tail -n 30
  record "offload benchmark" "${PIPESTATUS[0]}" ""
elif [ "${OFFLOAD_BENCH:-1}" = 1 ]; then
  record "offload benchmark" 1 "NOT RUN: the runtime's dependencies are missing"
fi

# 7. The engine on the GPU: decode and prefill tok/s, % of the roofline, CUDA graphs on and off.
if [ "${ENGINE_BENCH:-1}" = 1 ] && [ "$RUNTIME_OK" = 1 ]; then
  echo "== bench/gpu_engine.py"
  # shellcheck disable=SC2086
  timeout "${ENGINE_TIMEOUT:-200}" $PY bench/gpu_engine.py ${ENGINE_ARGS:-} ${OUTDIR:+--out "$OUTDIR/engine_bench.md"}
  record "gpu engine benchmark" $? ""
fi

echo
echo "== gpu_check summary"
printf '%s\n' "${SUMMARY[@]}"
echo "== gpu_check done, status $status"
exit $status
