#!/bin/bash
# On an offline GPU machine, from the checkout with the bundle of `make gpu-bundle` beside it:
# installs the bundle's wheels (no network), expands MiniLM to fp32, runs the GPU tests and
# bench/gpu.py. Results: $OUT/gpu.json (OUT defaults to ./results/bench).
#   bash bench/gpu_run.sh [bundle folder, default .gpu-bundle] [extra bench/gpu.py args]
# The whole script fits a 6-minute slot (TOTAL_S, default 300, leaves a minute's margin): the tests get at
# most TESTS_S, and bench/gpu.py's --budget-s is what is left of TOTAL_S when it starts (it runs its parts
# by priority and skips those that would not fit).
set -eu
TOTAL_S=${TOTAL_S:-300} TESTS_S=${TESTS_S:-120}
cd "$(dirname "$0")/.."
BUNDLE=$(cd "${1:-.gpu-bundle}" && pwd); shift || true
OUT=${OUT:-results/bench}; mkdir -p "$OUT"
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --target "$SITE" "$BUNDLE"/whl/*.whl
export MINILM_DIR=${MINILM_DIR:-/tmp/minilm}
if [ ! -f "$MINILM_DIR/model.safetensors" ]; then
  mkdir -p "$MINILM_DIR" && cp -r "$BUNDLE"/minilm/. "$MINILM_DIR"/
  python3 -c "
import sys
from safetensors.torch import load_file, save_file
d = sys.argv[1]
sd = load_file(d + '/model.fp16.safetensors')
save_file({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, d + '/model.safetensors')
" "$MINILM_DIR"
  rm "$MINILM_DIR/model.fp16.safetensors"
fi
export PYTHONPATH=$SITE:$BUNDLE/shim:$PWD ROUTING_ENV_DATA=$BUNDLE/data PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
# Compiled, not interpreted: tests/conftest.py defaults TRITON_INTERPRET to 1 (CPU CI), and the compiled-kernel
# tests skip themselves under the interpreter.
# The GPU tests of the fused low-rank ops, the sorted Triton kernels and the sync-free forward, under a
# timeout so that a compile storm cannot eat the benchmark's time.
# GPU_TESTS overrides the list (a shorter check when device time is short).
GPU_TESTS=${GPU_TESTS:-"tests/moe/test_lowrank_kernels.py tests/moe/test_triton_kernel.py tests/moe/test_sync_free.py tests/test_graphs.py"}
# shellcheck disable=SC2086
timeout "$TESTS_S" env TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider -m gpu $GPU_TESTS 2>&1 \
  | tail -n 15 | tee "$OUT/gpu_tests.txt"
[ "${PIPESTATUS[0]}" != 124 ] || echo "GPU tests stopped after ${TESTS_S}s (TESTS_S)" | tee -a "$OUT/gpu_tests.txt"
BUDGET=$((TOTAL_S - SECONDS)); [ "$BUDGET" -ge 30 ] || BUDGET=30
echo "bench/gpu.py --budget-s $BUDGET (${SECONDS}s spent)"
python3 bench/gpu.py --out "$OUT/gpu.json" --budget-s "$BUDGET" "$@"
