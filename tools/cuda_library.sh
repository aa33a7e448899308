#!/usr/bin/env bash
# The extension's CUDA library in place on a GPU machine (tools/gpu_check.sh's build stage, and
# tools/gpu_experiment.sh on a fresh machine): the carried prebuilt library (.prebuilt-cuda,
# tools/prebuilt_cuda.py) where its stamp fits these sources, this torch and this GPU and it runs
# a kernel; else the library built here (FORCE_CUDA=1, sm_90 unless TORCH_CUDA_ARCH_LIST says
# otherwise, MAX_JOBS=nproc). Then records the sources it came from (prebuilt_cuda.py built
# --record), so that a later call after a change here installs or builds again.
# Exit status 0 when a library that runs an IDD forward and backward on the GPU is in place.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# registered kernels are not enough: a library without code for this GPU's architecture loads,
# and fails at its first launch
runs_a_kernel() {
  "$PY" - <<'EOF'
import torch
import idd_ops
assert idd_ops.cuda_available(), f"no CUDA kernels: {idd_ops._LOAD_ERROR or 'built without them, or no GPU visible'}"
s = torch.randn(2, 8, 4, 4, device="cuda", requires_grad=True)
loss = idd_ops.inter_class_distance_loss(s, torch.randn(2, 8, 4, 4, device="cuda"),
                                         torch.randint(0, 3, (2, 16, 16), device="cuda"), 3)
loss.backward()
torch.cuda.synchronize()
print(f"CUDA kernels loaded and run (IDD forward and backward: {loss.item():.4g})")
EOF
}

if ! { "$PY" tools/prebuilt_cuda.py use && runs_a_kernel; }; then
  echo "building the CUDA library here"
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$PY" setup.py build_ext --inplace && runs_a_kernel || exit 1
fi
"$PY" tools/prebuilt_cuda.py built --record
