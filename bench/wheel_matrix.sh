#!/usr/bin/env bash
# One linclass wheel against several torch releases (issue 19): builds the wheel once
# with this checkout's .venv (its torch is the build torch), then for each torch version
# makes a fresh venv, installs that torch and the wheel, and runs the CPU kernel tests
# from a copy of tests/ outside the source tree, so `import linclass` is the installed
# wheel.  Not part of `make test`: it downloads torch releases (several GB each for the
# CUDA builds).  Results: bench/results/wheel-matrix.md.
#
#   bash bench/wheel_matrix.sh                      # the default versions below
#   VERSIONS="2.11.0 2.14.1" bash bench/wheel_matrix.sh
#   PYTHONS="python3.12 python3.13" bash bench/wheel_matrix.sh   # also other Pythons
#
# VERSIONS run with `python3`; each interpreter in PYTHONS gets the build's torch
# release (the abi3 wheel's other axis: Python 3.10 and newer).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
VERSIONS=${VERSIONS:-"2.11.0 2.13.0 2.14.1 2.15.0"}
PYTHONS=${PYTHONS:-}
OUT=${OUT:-$ROOT/bench/results/wheel-matrix.md}
WORK=${WORK:-$(mktemp -d /tmp/linclass-wheel-matrix.XXXXXX)}
# The test suite, less what tests the source tree itself (the wheel build, the per-ISA
# reruns, the vector-type check compiled from csrc/, the benchmark reports) or needs a
# GPU or Triton.
SKIP="test_wheel.py test_cpu_isa.py test_simd.py test_bench_report.py test_gpu.py test_gpu_check.py
      test_triton_aot.py test_triton_configs.py"

mkdir -p "$WORK/dist"
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" "$ROOT" || exit 1
WHEEL=$(ls "$WORK"/dist/linclass-*.whl)
BUILD_TORCH=$("$PY" -c "import torch; print(torch.__version__)")
BUILD_RELEASE=${BUILD_TORCH%%+*}
rm -rf "$WORK/tests" && cp -r "$ROOT/tests" "$WORK/tests"

{
  echo "# One wheel, several torch releases and Pythons"
  echo
  echo "Wheel \`$(basename "$WHEEL")\`, built once against torch $BUILD_TORCH"
  echo "($(date -u +%Y-%m-%d), $(uname -m), Python $("$PY" -c 'import platform; print(platform.python_version())'),"
  echo "commit $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet || echo ' with local changes'))."
  echo "Each row: a venv of that Python with that torch (made by the script; WORK's from an earlier run is reused), the wheel (\`pip install --no-deps\`) and the"
  echo "test extras but torchvision, \`pytest\` on a copy of tests/ outside the source tree"
  echo "(Triton uninstalled, so every kernel test runs the C++ backend), less: $(echo $SKIP)."
  echo "Command: \`${PYTHONS:+PYTHONS=\"$PYTHONS\" }bash bench/wheel_matrix.sh\`."
  echo
  echo "| Python | torch | CPU kernels loaded | tests | result |"
  echo "|---|---|---|---|---|"
} > "$WORK/table.md"

# "interpreter torch-release" pairs: VERSIONS with python3, then each of PYTHONS with the
# build's release.
pairs=()
for v in $VERSIONS; do pairs+=("python3 $v"); done
for p in $PYTHONS; do pairs+=("$p $BUILD_RELEASE"); done

for pair in "${pairs[@]}"; do
  read -r python v <<< "$pair"
  pyver=$("$python" -c 'import platform; print(platform.python_version())') || exit 1
  venv="$WORK/venv-$v"
  [ "$python" = python3 ] || venv="$WORK/venv-py$pyver-$v"
  tag=$(basename "$venv")
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"  # a venv of an earlier run is reused
  # A pip configuration file may cap torch (a constraints file): ignored here, since
  # newer releases are the point (PIP_* variables, e.g. PIP_FIND_LINKS, still apply).
  if ! PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" install -q "torch==$v" numpy pytest hypothesis expecttest \
      pytest-benchmark scikit-learn matplotlib tqdm > "$WORK/install-$tag.log" 2>&1; then
    echo "| $pyver | $v | - | - | torch $v could not be installed ($(tail -1 "$WORK/install-$tag.log")) |" >> "$WORK/table.md"
    continue
  fi
  "$venv/bin/pip" uninstall -q -y triton > /dev/null 2>&1
  "$venv/bin/pip" install -q --no-deps --force-reinstall "$WHEEL" || exit 1
  isa=$(cd "$WORK" && "$venv/bin/python" -c "import linclass; print(linclass.backends.cpu_isa())" 2>&1 | tail -1)
  tests=$(cd "$WORK/tests" && ls test_*.py | grep -vxF -f <(tr -s ' \n' '\n' <<< "$SKIP"))
  # shellcheck disable=SC2086
  (cd "$WORK/tests" && timeout 2400 "$venv/bin/python" -m pytest -q -p no:cacheprovider $tests \
      > "$WORK/tests-$tag.log" 2>&1)
  rc=$?
  summary=$(grep -E "passed|failed|error" "$WORK/tests-$tag.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  echo "| $pyver | $("$venv/bin/python" -c 'import torch; print(torch.__version__)') | $isa | $summary | $([ $rc = 0 ] && echo pass || echo "FAIL (rc $rc)") |" >> "$WORK/table.md"
  echo "Python $pyver, torch $v: $summary (rc $rc); log $WORK/tests-$tag.log"
done
mv "$WORK/table.md" "$OUT"
cat "$OUT"
