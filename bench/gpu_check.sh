#!/usr/bin/env bash
# One command for a lent GPU machine (torch, triton, nvcc, no internet): build linclass
# for the GPU that is there, run the GPU tests, run the GPU benchmarks, and write
# gpu-<device>.md / .json (plus the logs) into OUTDIR.  Meant to finish in under 8 minutes.
# The anchor wheels (Liger-Kernel, cut-cross-entropy) come from ../shared/wheels or
# LINCLASS_ANCHOR_WHEELS; BENCH_ARGS go to bench/gpu_bench.py (e.g. --no-sweep).
# The benchmarks run before the tests, so that a lease cut short still brings timings back.
#
#   bench/gpu_check.sh OUTDIR
#   bench/gpu_check.sh --tune OUTDIR        also sweep the Triton launch configurations
#                                           (bench/tune_gpu.py, ~2 min) and benchmark with
#                                           the fastest ones (OUTDIR/tuned.json);
#                                           TUNE_ARGS=--walks sweeps only the cross-entropy
#                                           row walks (large C)
#   bench/gpu_check.sh --cpu-smoke OUTDIR   no GPU: the benchmark and report code on CPU
#                                           (tiny shapes, Triton interpreter); the tests run this
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "--cpu-smoke" ]; then
  OUT=${2:?usage: bench/gpu_check.sh --cpu-smoke OUTDIR}
  mkdir -p "$OUT"
  TRITON_INTERPRET=1 "$PY" bench/gpu_bench.py --device cpu --quick --out "$OUT"
  exit $?
fi

TUNE=0
if [ "${1:-}" = "--tune" ]; then TUNE=1; shift; fi
OUT=${1:?usage: bench/gpu_check.sh [--tune] OUTDIR}
mkdir -p "$OUT"
t0=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }

"$PY" -c "import torch; assert torch.cuda.is_available(), 'gpu_check: no CUDA device'"
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt" 2>&1 || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> "$OUT/device.txt"
cat "$OUT/device.txt"

# Build for this GPU only (TORCH_CUDA_ARCH_LIST), with the CUDA kernels, offline; one CPU
# kernel module (the CPU tests run elsewhere), the widest this CPU runs.
cpu_isa=$("$PY" -c "import torch; c = torch.backends.cpu.get_cpu_capability().lower(); print('avx512' if 'avx512' in c else 'avx2' if 'avx2' in c else 'default')")
export TORCH_CUDA_ARCH_LIST="$arch" FORCE_CUDA=1 TRITON_INTERPRET=0 MAX_JOBS=${MAX_JOBS:-16} \
  LINCLASS_CPU_ISAS=${LINCLASS_CPU_ISAS:-$cpu_isa}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
log "building linclass (sm_${arch/./})"
"$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
"$PY" -c "import linclass; print('backends:', linclass.backends.available())" | tee -a "$OUT/device.txt"

if [ "$TUNE" = 1 ]; then
  log "Triton launch-configuration sweep"
  # shellcheck disable=SC2086  (TUNE_ARGS: words)
  "$PY" bench/tune_gpu.py --out "$OUT" ${TUNE_ARGS:-} > "$OUT/tune.log" 2>&1 || log "the sweep failed (see tune.log)"
  grep -E "^(ce|mm) |^overhead|^tune_gpu" "$OUT/tune.log" || true
  if [ -f "$OUT/tuned.json" ]; then export LINCLASS_TRITON_TUNED="$OUT/tuned.json"; fi
fi

# The field's anchors (Liger-Kernel, cut-cross-entropy: pure-Python wheels, no network
# there) into a folder of their own, on the benchmark's path only.
WHEELS=${LINCLASS_ANCHOR_WHEELS:-../shared/wheels}
ANCHORS=$(mktemp -d)
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps --no-index --target "$ANCHORS" "$WHEELS"/*.whl > "$OUT/anchors.log" 2>&1 \
    || log "the anchor wheels did not install (see anchors.log)"
else
  log "no anchor wheels in $WHEELS: the tables go without Liger and cut-cross-entropy"
fi

log "GPU benchmarks"
set +e
PYTHONPATH="$ANCHORS${PYTHONPATH:+:$PYTHONPATH}" "$PY" bench/gpu_bench.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/bench.log" | tail -40
bench_rc=${PIPESTATUS[0]}

log "GPU tests"
# in parallel when pytest-xdist is there (compiles dominate: the CPU cores share them)
par=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || true)
# shellcheck disable=SC2086  (par: words)
"$PY" -m pytest -q -p no:cacheprovider $par tests/test_gpu.py tests/test_backends.py tests/test_triton_configs.py \
  tests/test_sharded_phases.py::test_phases_on_cuda --durations=8 2>&1 | tee "$OUT/tests.log" | tail -15
tests_rc=${PIPESTATUS[0]}
set -e
log "done (benchmarks exit code $bench_rc, tests exit code $tests_rc)"
exit $(( bench_rc != 0 || tests_rc != 0 ))
