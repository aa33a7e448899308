"""IDD_OPS_CUDA_NEXT by groups (csrc/common/next_groups.h, idd_ops._switches.next_groups): both
sides read a value by the same rules, every group is read by code of its own, and on the emulator
each group switches its own kernels and not the other groups' its call reaches, with the same
values on either side; on a GPU, the compiled library reads the groups from the environment.

A GPU run whose next set fails in one group checks the others with IDD_OPS_NEXT_SET="all,-name"
(tools/gpu_check.sh), and the switch-on can take those (docs/DEVELOPING.md).
"""
import os
import re

import pytest
import torch

from idd_ops import _switches
from op_calls import KINDS, OPS

import idd_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "csrc", "common", "next_groups.h")
GROUPS = _switches.NEXT_GROUPS
PYTHON_READER = re.compile(r'cuda_next_enabled\("(\w+)"\)')  # a Python path function's read of its group

# (value, the groups it switches on), for whatever groups there are
FIRST, LAST = (GROUPS[0], GROUPS[-1]) if GROUPS else ("", "")
CASES = [(None, set()), ("", set()), ("0", set()), ("1", set(GROUPS)), ("all", set(GROUPS)), ("all,1", set(GROUPS))]
if GROUPS:
    CASES += [
        (FIRST, {FIRST}), (f" {FIRST} , {LAST} ", {FIRST, LAST}), (f"all,-{FIRST}", set(GROUPS) - {FIRST}),
        (f"{FIRST},-{FIRST}", set()), (f"-{FIRST},{FIRST}", {FIRST}), (f"{FIRST},0,{LAST}", {LAST}),
        (f"{FIRST},,", {FIRST}), (f"1,-{FIRST},-{LAST}", set(GROUPS) - {FIRST, LAST}),
    ]
BAD = ["2", "yes", "SKD", "all,tail", "-", "all,-nope", "1;0"]


@pytest.mark.parametrize("value,groups", CASES)
def test_python_reads_the_groups(value, groups):
    assert _switches.next_groups(value) == frozenset(groups)


@pytest.mark.parametrize("value", BAD)
def test_an_unknown_group_is_an_error_naming_the_variable(value):
    with pytest.raises(ValueError, match="IDD_OPS_CUDA_NEXT: unknown kernel group .* comma list of"):
        _switches.next_groups(value)


def test_the_environment_sets_the_groups(monkeypatch):
    try:
        monkeypatch.setenv("IDD_OPS_CUDA_NEXT", f"all,-{FIRST}" if GROUPS else "1")
        _switches._next_from_env.cache_clear()
        assert _switches.cuda_next_enabled() == (len(GROUPS) > 1)
        for group in GROUPS:
            assert _switches.cuda_next_enabled(group) == (group != FIRST)
        with pytest.raises(ValueError, match="group: expected one of"):
            _switches.cuda_next_enabled("tail")
        monkeypatch.setenv("IDD_OPS_CUDA_NEXT", "1,bogus")
        _switches._next_from_env.cache_clear()
        with pytest.raises(ValueError, match="unknown kernel group 'bogus'"):
            _switches.cuda_next_enabled()
    finally:
        monkeypatch.undo()
        _switches._next_from_env.cache_clear()


def _python_paths():
    """(path function, its group) of every _switches path function that reads a group."""
    import inspect
    for name, fn in vars(_switches).items():
        if name.endswith("_path") and callable(fn):
            found = PYTHON_READER.findall(inspect.getsource(fn))
            if found:
                yield fn, found[0]


def test_python_paths_follow_their_group_on_cuda_alone(monkeypatch):
    paths = list(_python_paths())
    read_py = set(PYTHON_READER.findall(open(_switches.__file__).read()))
    assert {group for _, group in paths} == read_py  # no reader outside the path functions
    try:
        for fn, group in paths:
            for value, on in [(group, True), (f"all,-{group}", False)]:
                monkeypatch.setenv("IDD_OPS_CUDA_NEXT", value)
                _switches._next_from_env.cache_clear()
                assert fn(torch.device("cuda")) == on and not fn(torch.device("cpu")), (fn.__name__, value)
    finally:
        monkeypatch.undo()
        _switches._next_from_env.cache_clear()


def _header_groups():
    """next_groups.h's table: (name, NextGroup member) in order, and each member's bit."""
    text = open(HEADER).read()
    table = re.findall(r'\{"(\w+)", NextGroup::(\w+)\}', text)
    bits = {m: int(b) for m, b in re.findall(r"^\s*(\w+) = 1u << (\d+),", text, re.M)}
    return table, bits


def test_both_sides_name_the_same_groups_in_the_same_bits():
    table, bits = _header_groups()
    assert [name for name, _ in table] == list(GROUPS)
    assert all(name == member for name, member in table)
    assert [bits[m] for _, m in table] == list(range(len(GROUPS)))


def test_every_group_is_read_and_every_reader_names_a_group():
    """The C++ groups by a kernel source, the Python ones by a path switch; no C++ reader is left
    without a group (the switch-on deletes each reader with its group)."""
    read = set()
    for folder in ("cuda", "composite", "cpu", "autograd"):
        for name in os.listdir(os.path.join(ROOT, "csrc", folder)):
            path = os.path.join(ROOT, "csrc", folder, name)
            if os.path.isfile(path):
                text = open(path).read()
                read |= set(re.findall(r"cuda_next_enabled\(NextGroup::(\w+)\)", text))
                assert not re.search(r"cuda_next_enabled\(\s*\)", text), name
    python = open(_switches.__file__).read()
    read_py = set(PYTHON_READER.findall(python))
    assert read | read_py == set(GROUPS) == set(MARKER)


# --- the emulator: its groups through next_groups.h's own parser ---------------------------------

@pytest.fixture(scope="module")
def emu():
    from cuda_emu import build
    return build.load()


@pytest.mark.parametrize("value,groups", [c for c in CASES if c[0] is not None])
def test_cpp_reads_the_groups_as_python_does(emu, value, groups):
    try:
        mask = emu._emu_next_groups(value)
    finally:
        emu._emu_configure(False, 0)
    assert mask == sum(1 << GROUPS.index(g) for g in groups)


@pytest.mark.parametrize("value", BAD)
def test_cpp_refuses_what_python_refuses(emu, value):
    with pytest.raises(RuntimeError, match="IDD_OPS_CUDA_NEXT: unknown kernel group .* comma list of"):
        emu._emu_next_groups(value)


# Per group: a call that reaches its code (op_calls' name, or position_mean), and the launch that
# shows it ran (a source file of the group's, and a word on the launch's line or the one before).
MARKER = {
    "skd": ("skd", "affinity_loss_cuda.cu", "gram_tail_means_kernel"),
    "idd_tail": ("idd_loss", "idd_tail_forward_cuda.cu", "idd_tail_one_pass_kernel"),
    "class_sums": ("idd_loss", "class_sums_cuda.cu", "*fold"),
    "position": ("position_mean", "position_encoding_loss_tables_cuda.cu", "position_tables_forward_sum"),
    "cosine_backward": ("ifvd", "cosine_slots_backward_cuda.cu", "row_pairs"),
    "ifvd": ("ifvd", "ifvd_maps_cuda.cu", "<<<"),
    "class_means": ("class_centroids", "class_means_cuda.cu", "<<<"),
    "pixel_kd": ("pixel_kd", "pixel_kd_sum_cuda.cu", "<<<"),
}


def _call(name):
    """(inputs, run) of a small forward+backward that reaches the group's code."""
    if name == "position_mean":  # the forward's sum is taken for "mean" and "sum" alone
        inputs = [torch.rand(2, len(KINDS), 16, 24, generator=torch.Generator().manual_seed(0)).requires_grad_()]

        def run(p):
            p.grad = None
            loss = idd_ops.position_encoding_loss(p, KINDS)
            loss.backward()
            return [loss, p.grad]
        return inputs, run
    inputs, run = OPS[name]("cpu")
    return inputs, run


def _sites(profile):
    """{(file, line): launches} of _emu_profile's lines."""
    out = {}
    for line in profile.splitlines():
        site, launches, _ = line.split("\t")
        path, number = site.rsplit(":", 1)
        out[(path, int(number))] = int(launches)
    return out


def _launched(before, after, source, word):
    """Whether a launch between the two profiles was at a site of `source` with `word` by it."""
    for (path, number), count in after.items():
        if count > before.get((path, number), 0) and os.path.basename(path) == source:
            lines = open(os.path.join(ROOT, path)).read().splitlines()
            if word in "\n".join(lines[max(number - 2, 0):number]):
                return True
    return False


@pytest.mark.parametrize("group", GROUPS)
def test_each_group_switches_its_own_code_alone(emu, group):
    """On the emulator: the group alone runs its code and not the other groups' that its call
    reaches, all but it the reverse, and both give the CPU's loss and gradient."""
    from cuda_emu.override import emulated_cuda
    call = MARKER[group][0]
    inputs, run = _call(call)
    expected = run(*inputs)
    reached = [g for g, marker in MARKER.items() if marker[0] == call]
    for value, on in [(group, {group}), (f"all,-{group}", set(reached) - {group})]:
        with emulated_cuda("next", seed=5, groups=value) as e:
            before = _sites(e._emu_profile())
            got = run(*inputs)
            after = _sites(e._emu_profile())
        for g in reached:
            assert _launched(before, after, *MARKER[g][1:]) == (g in on), (value, g)
        for g, x in zip(got, expected):
            torch.testing.assert_close(g, x, rtol=1e-5, atol=1e-6, msg=f"IDD_OPS_CUDA_NEXT={value}")


# --- the real library on a GPU: the switch as the process's environment sets it ---------------------

CHILD = """
import sys, torch, idd_ops
from torch.profiler import profile, ProfilerActivity
from op_calls import OPS
inputs, run = OPS[sys.argv[1]]("cuda")
try:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(*inputs)
        torch.cuda.synchronize()
except (RuntimeError, ValueError) as e:  # the C++ switch raises the one, Python's the other
    print("raised:", str(e).splitlines()[0])
else:
    print("kernels:", " ".join(e.name for e in prof.events()))
"""


def _child(value, call):
    import subprocess
    import sys
    env = dict(os.environ, IDD_OPS_CUDA_NEXT=value, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    proc = subprocess.run([sys.executable, "-c", CHILD, call], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.skipif("idd_tail" not in MARKER, reason="no idd_tail group behind the switch")
def test_the_cuda_library_reads_the_groups_from_the_environment():
    """The compiled library's own reading (cuda_next.h: once per process, from the environment),
    which the emulator replaces: the IDD tail's one-pass kernel under its group alone and not
    under all but it, and a group it does not know raises at the op."""
    call, _, kernel = MARKER["idd_tail"]
    assert kernel in _child("idd_tail", call)
    out = _child("all,-idd_tail", call)
    assert out.startswith("kernels:") and kernel not in out
    assert "IDD_OPS_CUDA_NEXT: unknown kernel group 'tail'" in _child("all,-tail", call)
