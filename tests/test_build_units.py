"""The build compiles csrc/unit_<group>.cpp, one translation unit per group of C++ files (setup.py):
a file of the group that its unit does not include would be built into no library at all."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = ("cpu", "composite", "autograd")


@pytest.mark.parametrize("group", GROUPS)
def test_each_unit_includes_every_file_of_its_group_once(group):
    text = open(os.path.join(ROOT, "csrc", f"unit_{group}.cpp")).read()
    included = re.findall(r'^#include "([^"]+)"', text, flags=re.M)
    files = sorted(os.path.relpath(f, os.path.join(ROOT, "csrc")) for f in glob.glob(os.path.join(ROOT, "csrc", group, "*.cpp")))
    assert sorted(included) == files
    assert len(set(included)) == len(included)


@pytest.mark.parametrize("group", GROUPS)
def test_no_file_of_a_unit_has_a_using_directive(group):
    """Its names would reach every file after it in the unit (using-declarations name one each)."""
    for path in glob.glob(os.path.join(ROOT, "csrc", group, "*.cpp")):
        assert not re.search(r"^\s*using\s+namespace\b", open(path).read(), flags=re.M), path


def test_the_build_compiles_the_units_and_not_the_groups_files():
    """setup.py's source list: csrc/*.cpp (the schemas and the units) and the per-capability
    kernel files, each compiled once."""
    setup = open(os.path.join(ROOT, "setup.py")).read()
    units = {os.path.basename(f) for f in glob.glob(os.path.join(ROOT, "csrc", "unit_*.cpp"))}
    assert units == {f"unit_{g}.cpp" for g in GROUPS}
    for group in GROUPS:
        assert f'os.path.join("csrc", "{group}", "*.cpp")' not in setup, group
    assert 'os.path.join("csrc", "*.cpp")' in setup


def test_the_emulators_units_include_every_translated_source_once(tmp_path):
    """tests/cuda_emu/build.py compiles the translated CUDA sources as a few units that include
    them (a source left out would register no kernel)."""
    from tests.cuda_emu import build

    sources = []
    for i, size in enumerate([5, 400, 30, 120, 7, 300]):
        sources.append(tmp_path / f"s{i}.cpp")
        sources[-1].write_text("x" * size)
    units = build.grouped(sources, out=tmp_path / "out", units=2)
    included = [re.findall(r'^#include "([^"]+)"', u.read_text(), flags=re.M) for u in units]
    assert len(units) == 2 and sorted(sum(included, [])) == sorted(str(s) for s in sources)
    sizes = [sum(os.path.getsize(p) for p in group) for group in included]
    assert sorted(sizes) == [430, 432]  # largest first, each to the smaller unit


def test_the_sdist_carries_every_source(tmp_path):
    """An sdist holds every file under csrc/ (MANIFEST.in): setuptools alone packed only the
    seven .cpp files setup.py names, and a wheel built from that sdist failed on its first
    #include. The egg-info goes to tmp_path, so the source tree is left as it was."""
    import subprocess
    import sys
    import tarfile

    out = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist",
                          "--formats=gztar", "--dist-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (archive,) = tmp_path.glob("idd_ops-*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    sources = {os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)
               if os.path.isfile(path)}
    assert sources - packed == set()
    assert {"setup.py", "pyproject.toml", "README.md", "LICENSE", "idd_ops/__init__.py"} <= packed
