"""The switch-on of the IDD_OPS_CUDA_NEXT kernels (SKD's pivot, pooling, centring and gradient
loads ahead, the IDD tail's split Grams, IFVD's two maps, the class means and pixel KD's sum in one op
each), prepared without a GPU as a commit
in tools/cuda_next_switch_on.patch (docs/DEVELOPING.md, "A session with a GPU", step 5), still
applies to this tree: a change to a file it touches fails here, and refreshing the patch is part
of that change (`git am -3` it on a branch, resolve,
`git format-patch -1 --stdout > tools/cuda_next_switch_on.patch`)."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCH = os.path.join(ROOT, "tools", "cuda_next_switch_on.patch")


def _git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_switch_on_patch_applies():
    if shutil.which("git") is None or _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("needs a git checkout")
    check = _git("apply", "--check", PATCH)
    assert check.returncode == 0, (
        "tools/cuda_next_switch_on.patch no longer applies; refresh it (git am -3 on a branch, resolve, "
        "git format-patch -1 --stdout > tools/cuda_next_switch_on.patch):\n" + check.stderr[-3000:])
