#!/usr/bin/env bash
# The GPU device check (docs/gpu.md): one run on a lent GPU machine, under 8 minutes.
#
#   scripts/device-check.sh prepare   here, once: .device/ gets the wheels the device's Python lacks
#                                     (gguf; grpcio and protobuf at this project's versions) and the
#                                     default model's tokenizer (its weights are too big to travel and
#                                     the checks use random weights of its shape anyway)
#   scripts/device-check.sh run       on the device, carrying .device: writes $OUT/device-check.json
#                                     (BENCHMARKS.md format, the GPU's name in it) and the log beside it
#   scripts/device-check.sh smoke     here: every check's code on tiny shapes on the CPU (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# the device's Python (3.12) and platform; versions as this project pins or runs them here
WHEELS=(gguf==0.19.0 grpcio==1.85.3 protobuf==7.36.2)

tokenizer() {  # the default model's tokenizer files into $1
  "$PY" -c "import sys; from pathlib import Path; from kvweave.model_files import load_tokenizer, write_tokenizer_files
t = load_tokenizer('smollm2-135m'); write_tokenizer_files(t.tokenizer, t.max_seq_len, Path(sys.argv[1]))" "$1"
}

case "${1:-}" in
prepare)
  rm -rf .device && mkdir -p .device/whl .device/tokenizer
  tokenizer .device/tokenizer
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .device/whl "${WHEELS[@]}"
  du -sh .device
  ;;
run)
  out=${OUT:-/tmp/device-check}
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device/whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
  set +e
  timeout 460 python3 -m benchmarks.device_check --out "$out" --tokenizer-dir .device/tokenizer --budget-s 380 \
    2>&1 | tee "$out/device-check.log"
  rc=${PIPESTATUS[0]}
  set -e
  exit "$rc"
  ;;
smoke)
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  tokenizer "$tmp/tokenizer"
  TRITON_INTERPRET=1 "$PY" -m benchmarks.device_check --smoke --out "${OUT:-$tmp/out}" --tokenizer-dir "$tmp/tokenizer"
  ;;
*)
  echo "usage: scripts/device-check.sh prepare|run|smoke" >&2
  exit 2
  ;;
esac
