"""Differential fuzzer of idd_ops: random cases of every public loss and every op with CUDA
kernels, run on the CPU kernels, on the CUDA kernels under the emulator of tests/cuda_emu,
and on a GPU where there is one, each compared with the float64 reference
(idd_ops.reference), forward and backward.

    python -m tests.fuzz --targets cpu,cpu_alt,default --cases 2000 --seed 1

Files: inputs.py (random tensors: dtypes, layouts, scales, label patterns), floors.py (the size
of a scale-free output's terms), cases.py (a case, the registry, IDD's and its building blocks'
generators), baseline_cases.py (the baselines' and the position loss's generators), raw_ops.py
(the raw ops' generators), targets.py (where a case runs), compare.py (errors, tolerances, known
differences, a mismatch's reproducer), runner.py (a run and its report), __main__.py (the
command line).
tests/test_fuzz.py runs a fixed-seed budget of it in the suite (and a larger one on a GPU).
"""
