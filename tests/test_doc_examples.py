"""Every example the documentation shows runs: each ```python block of README.md and docs/*.md
(each block on its own, as a reader would paste it), and every docstring example (``>>>``) of
the package's modules, outputs checked by doctest. They use tiny tensors: seconds in all."""
import doctest
import importlib
import pathlib
import re

import pytest
import torch

import idd_ops

ROOT = pathlib.Path(idd_ops.__file__).parent.parent
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MODULES = sorted(p.stem for p in (ROOT / "idd_ops").glob("*.py") if p.stem != "__init__")
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny examples: one thread avoids OpenMP start-up and spinning on shared cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def python_blocks(path):
    return BLOCK.findall(path.read_text())


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.name)
def test_markdown_python_blocks_run(path):
    for i, block in enumerate(python_blocks(path), 1):
        exec(compile(block, f"{path.name}, python block {i}", "exec"), {"__name__": "__doc_example__"})


def test_markdown_links_resolve():
    for path in MARKDOWN:
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", path.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (path.parent / target).exists(), f"{path.name}: broken link {target}"


def test_the_readme_and_api_docs_have_examples():
    assert len(python_blocks(ROOT / "README.md")) >= 1
    assert len(python_blocks(ROOT / "docs" / "API.md")) >= 2


def _docstring_tests(module_name):
    module = importlib.import_module(f"idd_ops.{module_name}")
    return [t for t in doctest.DocTestFinder().find(module) if t.examples]


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in _docstring_tests(module_name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of idd_ops.{module_name} failed (see output)"


def test_examples_are_doctests():
    """An ``Example::`` literal block is never run: examples are written as ``>>>`` lines."""
    for module_name in MODULES:
        text = (ROOT / "idd_ops" / f"{module_name}.py").read_text()
        assert "Example::" not in text, module_name
    names = {t.name for m in MODULES for t in _docstring_tests(m)}
    assert {"idd_ops.distiller.Distiller", "idd_ops.probe.probe_position_information"} <= names
