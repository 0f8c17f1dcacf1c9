#!/usr/bin/env bash
# Wheels of the runtime dependencies that the lent GPU machine's image lacks (it has torch, triton,
# safetensors, tokenizers, pyyaml, rich, grpcio, prometheus-client; see the device tool's KINDS.md), for its
# CPython 3.12, at the versions requirements.lock pins. They go to .whl/ (git-ignored), which the device
# call names in `carry`; bench/gpu_check.sh installs them into a temporary folder there.
#
#   bash bench/gpu_wheels.sh && du -sh .whl      # then: device run, carry [".whl"], bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(pydantic pydantic-core annotated-types typing-inspection grpcio-health-checking grpcio-reflection protobuf)
mkdir -p .whl
for name in "${PACKAGES[@]}"; do
  version=$(grep -E "^${name}==" requirements.lock | cut -d= -f3)
  [ -n "$version" ] || { echo "error: $name is not in requirements.lock" >&2; exit 1; }
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${name}==${version}"
done
ls .whl
