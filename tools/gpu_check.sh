#!/usr/bin/env bash
# One-call GPU check: build with CUDA, run the GPU tests, the CUDA benchmark report and the
# demo's quick preset on the GPU, writing every log and result under $OUT (default
# ./gpu-check-out). Each stage has its own time limit, so a failing or slow stage still leaves
# the others' results; the exit status is the number of failed stages.
#
#   bash tools/gpu_check.sh             # on a GPU machine (CUDA torch, nvcc; no registry needed)
#   bash tools/gpu_check.sh --dry-run   # anywhere: checks that every stage's command exists
#
# Test dependencies missing on the GPU machine come from ./wheelhouse (git-ignored), prepared
# beforehand on a machine with a registry:  bash tools/gpu_check.sh --prepare-wheelhouse
# Limits (seconds) can be overridden: BUILD_S, TESTS_S, BENCH_S, DEMO_S. Whole check: <= 8 min
# (30 + 60 + 150 + 90 + 90 + 60 s at the most).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/gpu-check-out}
PY=${PYTHON:-python3}
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  --prepare-wheelhouse)
    # Wheels for the GPU machine's Python (3.12 unless GPU_PY says otherwise), downloaded here.
    exec "$PY" -m pip download -q --only-binary=:all: --python-version "${GPU_PY:-3.12}" \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      -d wheelhouse numpy matplotlib pytest-benchmark ninja ;;
  "") ;;
  *) echo "usage: bash tools/gpu_check.sh [--dry-run | --prepare-wheelhouse]" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
failed=0
SUMMARY="$OUT/summary.md"
echo "# GPU check $(date -u +%FT%TZ)" > "$SUMMARY"

# stage NAME LIMIT_S COMMAND...: runs COMMAND with a time limit, log in $OUT/NAME.log
stage() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/$name.log"
  if [ "$DRY" = 1 ]; then
    echo "dry run: not run" >> "$OUT/$name.log"
    return 0
  fi
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  echo "| $name | rc $rc | $((SECONDS - t0)) s |" >> "$SUMMARY"
  [ $rc -eq 0 ] || { failed=$((failed + 1)); echo "$name FAILED (rc $rc), see $OUT/$name.log"; }
}

# Each stage's prerequisites, checked in both modes (the dry run's whole job).
check() { [ "$@" ] || { echo "missing: $*" | tee -a "$OUT/dry-run.log"; failed=$((failed + 1)); }; }
for f in setup.py tests/conftest.py benchmarks/report.py idd_ops/demo/cli.py tools/nvcc_check.py; do check -f "$f"; done
tools="timeout"; [ "$DRY" = 1 ] || tools="timeout nvcc"  # nvcc is checked where the build runs
for tool in $tools; do command -v $tool > /dev/null || { echo "missing: $tool"; failed=$((failed + 1)); }; done
# The build runs ninja in parallel; without it torch compiles one file at a time (too slow here).
"$PY" -c "import torch.utils.cpp_extension as c; c.verify_ninja_availability()" 2> /dev/null \
  || [ -d wheelhouse ] || { echo "missing: ninja (and no ./wheelhouse to install it from)"; failed=$((failed + 1)); }
if [ "$DRY" = 1 ]; then
  "$PY" -m benchmarks.report --help > /dev/null || failed=$((failed + 1))
  "$PY" -m idd_ops.demo.cli --help > /dev/null || failed=$((failed + 1))
  "$PY" -m pytest -q --collect-only -m gpu tests > "$OUT/collect.log" 2>&1 || failed=$((failed + 1))
  grep -q "cuda" "$OUT/collect.log" || { echo "no GPU tests collected"; failed=$((failed + 1)); }
fi

stage env 30 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())'; nvcc --version"
if [ -d wheelhouse ]; then
  stage deps 60 "$PY" -m pip install -q --no-index --find-links wheelhouse numpy matplotlib pytest-benchmark ninja
fi
# Hopper only (the GPU at hand) keeps the build short; MAX_JOBS uses every core.
stage build "${BUILD_S:-150}" env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install -v --no-build-isolation --no-deps -e .
# With pytest-xdist (on the CUDA image) the tests run in workers, so a test that crashes the
# process is reported as one failure instead of ending the stage; -rfE lists every failure.
XDIST=""; "$PY" -c "import xdist" 2> /dev/null && XDIST="-n 8"
stage tests "${TESTS_S:-90}" "$PY" -m pytest -q -rfE $XDIST -m gpu -p no:cacheprovider --junitxml="$OUT/tests.xml" tests
# Every CUDA case but SKD pool 1 (its reference alone takes a minute), 5 rounds, no torch.compile column.
stage bench "${BENCH_S:-90}" "$PY" -m benchmarks.report --device cuda --no-compile --repeat 5 \
  --skip "skd pool1" --out "$OUT/RESULTS-cuda.md"
stage demo "${DEMO_S:-60}" "$PY" -m idd_ops.demo.cli --preset quick --device cuda --out "$OUT/demo"
echo "failed stages: $failed" | tee -a "$SUMMARY"
exit $failed
