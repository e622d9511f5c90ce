#!/usr/bin/env bash
# GPU check of iwd_fast, for the GPU machine (one H200, no internet): print the machine, build the
# package in place with the CUDA extension, then run benchmarks/gpu_check.py (correctness of every GPU
# backend against float64 oracles, then timings). Designed to finish in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # JSON + logs in ${OUT:-benchmarks/results}/
#   bash benchmarks/gpu_check.sh --quick    # extra arguments go to gpu_check.py
#
# Files: gpu_check.json (results), gpu_check.log (its output), gpu_check_build.log (the build).
# When OUT is set they are also copied to benchmarks/results/.
# Environment: PYTHON (default python), GPU_CHECK_TOTAL_S (default 450: the seconds the whole script
# aims at; gpu_check.py gets what the build leaves as --time-budget, at least 120).
# Exit code: that of gpu_check.py (0: every correctness check passed; 1: one failed), 3 if the build
# failed both ways (gpu_check.py still runs then, and reports the CUDA backend missing).
set -euo pipefail
cd "$(dirname "$0")/.."

T0=$(date +%s)
PY=${PYTHON:-python}
unset TRITON_INTERPRET  # compiled Triton kernels on the GPU, never the CPU interpreter
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"

echo "== machine"
nvidia-smi || echo "nvidia-smi failed"
"$PY" - <<'EOF' || echo "python version probe failed"
import platform
import numpy
import torch
print("python", platform.python_version(), "| numpy", numpy.__version__)
print("torch", torch.__version__, "| torch CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version(),
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:  # noqa: BLE001
    print("triton: import failed:", exc)
EOF
(nvcc --version | tail -n 2) || echo "nvcc not found"
(ninja --version 2>/dev/null | sed 's/^/ninja /') || echo "ninja not found (the extension builds without it, slower)"

echo "== build (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0)"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
BUILD_LOG="$RESULTS/gpu_check_build.log"
B0=$(date +%s)
BUILD_RC=0
if "$PY" -m pip --version >/dev/null 2>&1 \
   && "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tee "$BUILD_LOG"; then
  BUILD="pip install --no-build-isolation --no-deps -e ."
else
  echo "pip unusable or pip install failed: falling back to setup.py build_ext --inplace" | tee -a "$BUILD_LOG"
  if "$PY" setup.py build_ext --inplace 2>&1 | tee -a "$BUILD_LOG"; then
    BUILD="setup.py build_ext --inplace"
  else
    BUILD="FAILED"
    BUILD_RC=3
  fi
fi
BUILD_S=$(( $(date +%s) - B0 ))
echo "build: ${BUILD} in ${BUILD_S} s" | tee -a "$BUILD_LOG"
"$PY" -m iwd_fast.env || echo "python -m iwd_fast.env failed"

BUDGET=$(( ${GPU_CHECK_TOTAL_S:-450} - ($(date +%s) - T0) ))
if [ "$BUDGET" -lt 120 ]; then BUDGET=120; fi
echo "== gpu_check.py (timing budget ${BUDGET} s)"
RUN=("$PY" benchmarks/gpu_check.py --out "$RESULTS/gpu_check.json" --time-budget "$BUDGET" "$@")
if command -v timeout >/dev/null 2>&1; then
  RUN=(timeout -k 10 $(( BUDGET + 120 )) "${RUN[@]}")  # a hung kernel must not eat the session
fi
set +e
GPU_CHECK_BUILD_S=$BUILD_S "${RUN[@]}" 2>&1 | tee "$RESULTS/gpu_check.log"
RC=${PIPESTATUS[0]}
set -e

if [ -n "${OUT:-}" ]; then
  mkdir -p benchmarks/results
  for f in gpu_check.json gpu_check.log gpu_check_build.log; do
    if [ -f "$RESULTS/$f" ]; then cp "$RESULTS/$f" benchmarks/results/; fi
  done
fi
echo "== done in $(( $(date +%s) - T0 )) s: build ${BUILD} (${BUILD_S} s), gpu_check.py exit code ${RC}"
if [ "$RC" -eq 0 ] && [ "$BUILD_RC" -ne 0 ]; then RC=$BUILD_RC; fi
exit "$RC"
