#!/usr/bin/env bash
# The library against another release of torch (and of Python): a venv with that torch from the
# package index, a copy of this working tree (tracked and new files, no build outputs) built in
# it, then the test suite. This is how "torch >= 2.4" in setup.py is checked (docs/DEVELOPING.md).
#
#   bash tools/torch_version_check.sh 2.4.1                   # with python3
#   bash tools/torch_version_check.sh 2.4.1 python3.9         # the oldest pair setup.py admits
#   PYTEST_ARGS="-x tests/test_api.py" bash tools/torch_version_check.sh 2.15.0
#
# PyPI's Linux torch is a CUDA build (2-3 GB with its CUDA libraries; it imports without a GPU).
# The build is CPU-only by default: torch refuses a CUDA toolkit of another major version than its
# own, and the CUDA sources are compiled against this torch's headers by the suite's nvcc test
# anyway (tools/nvcc_check.py). FORCE_ONLY_CPU=0 builds the CUDA kernels too.
# A pip configuration that caps torch (this project's build machines cap it at the releases on
# their disk) is set aside for one run by PIP_CONFIG_FILE=/dev/null.
# BUILD_ONLY=1 stops after the build (tools/prebuilt_cuda.py builds the GPU machine's library so).
# Work folder: $WORK (default /tmp/idd-torch-<torch>-py<X.Y>): venv/ (reused), src/ (fresh but for
# src/build/, which ninja reuses for the sources that did not change), build.log, tests.log.
# Exit status: the build's, then the test run's.
set -euo pipefail
VERSION=${1:?usage: tools/torch_version_check.sh TORCH_VERSION [PYTHON]}
PY=${2:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
WORK=${WORK:-/tmp/idd-torch-$VERSION-py$PYVER}
VENV=$WORK/venv
mkdir -p "$WORK"

t0=$SECONDS
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo "== torch $VERSION on Python $PYVER into $VENV"
"$VENV/bin/python" -m pip install -q "torch==$VERSION" numpy pytest pytest-xdist ninja setuptools wheel matplotlib
echo "   installed in $((SECONDS - t0)) s: $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"

mkdir -p "$WORK/src" && find "$WORK/src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
  tar -C "$ROOT" --null -T - --ignore-failed-read -cf - 2> /dev/null | tar -xf - -C "$WORK/src"
cd "$WORK/src"

t0=$SECONDS
echo "== build (log: $WORK/build.log)"
FORCE_ONLY_CPU=${FORCE_ONLY_CPU:-1} MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VENV/bin/python" setup.py build_ext --inplace \
  > "$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; echo "build FAILED"; exit 1; }
echo "   built in $((SECONDS - t0)) s"
[ "${BUILD_ONLY:-0}" = 1 ] && exit 0

t0=$SECONDS
echo "== tests (log: $WORK/tests.log)"
rc=0
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
"$VENV/bin/python" -m pytest -q -n "${WORKERS:-2}" -p no:cacheprovider -rfE ${PYTEST_ARGS:-tests} > "$WORK/tests.log" 2>&1 || rc=$?
grep -E "^(FAILED|ERROR) " "$WORK/tests.log" || true
echo "   torch $VERSION, Python $PYVER: $(tail -1 "$WORK/tests.log") ($((SECONDS - t0)) s)"
exit $rc
