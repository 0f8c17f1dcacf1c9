#!/usr/bin/env bash
# The one GPU check: environment, the GPU tests, tile tuning for Mixtral bf16, the kernel benchmark, then
# the offload benchmark, in under 10 minutes (timeouts 120 + 60 + 220 + 60 + 150 + 60 s; a step that hits its
# timeout is cut and the script goes on; about 3 to 6 minutes on an H200).
#
#   bash bench/gpu_check.sh            # from the repo root on a CUDA machine
#   OUT=/some/dir bash bench/gpu_check.sh   # also writes env.txt, pytest_gpu*.txt, tune.txt, the tuned
#                                           # table (*.json) and kernels_bench.md there
#   BENCH_ARGS='--shapes mini --m 1,16' bash bench/gpu_check.sh   # a shorter benchmark
#   TUNE=0 bash bench/gpu_check.sh      # keep kernels/tuned/ as it is (the benchmark uses it either way)
#   OFFLOAD_BENCH=0 bash bench/gpu_check.sh   # leave out step 6
#
# Runtime dependencies missing on the GPU machine (pydantic, grpcio-health-checking, ...) may travel as
# wheels in .whl/ (git-ignored): they are installed into a temporary folder first, never system-wide.
# Works without installing anything: the lent GPU machine has torch and triton (2.11 / 3.6 there) but
# no network and not every runtime dependency, so the package is put on PYTHONPATH through a shadow
# tree that maps moe_runtime.kernels -> kernels/ (the same mapping as pyproject's package-dir), and the
# kernel tests run with --noconftest (the suite-wide conftest imports the whole runtime).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUTDIR=${OUT:-}
[ -n "$OUTDIR" ] && mkdir -p "$OUTDIR"
tee_out() { if [ -n "$OUTDIR" ]; then tee "$OUTDIR/$1"; else cat; fi; }
status=0

# 0. Carried wheels, if any.
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE=$(mktemp -d)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
    && export PYTHONPATH="$SITE" || echo "warning: the carried wheels did not install"
fi

# 1. Import path: a shadow moe_runtime/ whose entries link to the repo's, plus kernels/ and cluster/.
SHADOW=$(mktemp -d)
mkdir "$SHADOW/moe_runtime"
for entry in moe_runtime/*; do ln -s "$ROOT/$entry" "$SHADOW/moe_runtime/"; done
ln -s "$ROOT/kernels" "$SHADOW/moe_runtime/kernels"
[ -d cluster ] && ln -s "$ROOT/cluster" "$SHADOW/moe_runtime/cluster"
export PYTHONPATH="$SHADOW:$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # ROOT for `tests.*` imports
export PYTHONSAFEPATH=1  # never put the cwd (the repo root, whose moe_runtime/ lacks kernels/) first
export PYTHONUNBUFFERED=1

# 2. Environment.
{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
  $PY -c "import moe_runtime.kernels as k; print('moe_runtime.kernels from', k.__file__)"
} 2>&1 | tee_out env.txt

# 3. GPU tests: the kernels' own (no conftest needed), then the rest of the suite's gpu tests if it imports.
echo "== pytest -m gpu tests/kernels"
timeout 120 $PY -m pytest -m gpu tests/kernels --noconftest -p no:cacheprovider -q -rfE 2>&1 | tee_out pytest_gpu.txt
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== pytest -m gpu (rest of the suite; needs the full runtime's dependencies)"
timeout 60 $PY -m pytest -m gpu --ignore=tests/kernels -p no:cacheprovider -q -rfE 2>&1 | tail -n 15 | tee_out pytest_gpu_rest.txt

# 4. Tile tuning for Mixtral-8x7B bf16 on this GPU: writes kernels/tuned/E=8,N=14336,device_name=...json
#    (the benchmark below then uses it, and shows the untuned heuristic beside it).
if [ "${TUNE:-1}" = 1 ]; then
  echo "== bench/tune_fused_moe.py"
  timeout 220 $PY bench/tune_fused_moe.py --shape mixtral --dtype bf16 --budget-s 160 2>&1 | tee_out tune.txt
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  echo "== pytest -m gpu -k mixtral tests/kernels (again, now through the tuned table)"
  timeout 60 $PY -m pytest -m gpu -k mixtral tests/kernels --noconftest -p no:cacheprovider -q -rfE 2>&1 | tail -n 15 \
    | tee_out pytest_gpu_tuned.txt
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  if [ -n "$OUTDIR" ]; then  # '=' and ',' may not survive a copy back: tuned_<name with them as '_'>.json
    for f in kernels/tuned/*.json; do cp "$f" "$OUTDIR/tuned_$(basename "$f" | tr '=,' '__')"; done
  fi
fi

# 5. Benchmark: Mixtral-8x7B and mini shapes, bf16, the issue's M list (BENCH_ARGS overrides).
echo "== bench/kernels.py"
BENCH_OUT=${OUTDIR:+$OUTDIR/kernels_bench.md}
# shellcheck disable=SC2086
timeout 150 $PY bench/kernels.py ${BENCH_ARGS:---shapes mixtral,mini --dtype bf16 --repeats 25} ${BENCH_OUT:+--out "$BENCH_OUT"}
[ $? -eq 0 ] || status=1

# 6. Offload on the GPU (pinned host tier, side-stream copies): needs the full runtime's dependencies.
echo "== bench/offload.py (pinned tier)"
if [ "${OFFLOAD_BENCH:-1}" != 1 ]; then
  echo "skipped: OFFLOAD_BENCH=${OFFLOAD_BENCH}"
elif $PY -c "import moe_runtime.offload, moe_runtime.engine.llm_engine" 2>/dev/null; then
  timeout 60 $PY bench/offload.py --device cuda --tier pinned --models tiny-trained --batches 1,16 --tokens 16 \
      --repeats 2 ${OUTDIR:+--out "$OUTDIR/offload_bench.md"} 2>&1 | tail -n 30
else
  echo "skipped: the runtime's dependencies (pydantic, safetensors, tokenizers) are not importable here"
fi

rm -rf "$SHADOW" ${SITE:+"$SITE"}
echo "== gpu_check done, status $status"
exit $status
