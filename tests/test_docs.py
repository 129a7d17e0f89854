"""Documentation is code: every Python block in docs/ and every notebook runs here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

_BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(page: Path) -> list[str]:
    return [
        code
        for flags, code in _BLOCK.findall(page.read_text(encoding="utf-8"))
        if "no-run" not in flags
    ]


def test_docs_and_notebooks_exist() -> None:
    """The getting-started and concepts pages and the basic-usage notebook are there."""
    names = {p.name for p in DOCS}
    assert {"getting-started.md", "concepts.md"} <= names
    assert any(p.name == "basic_usage.ipynb" for p in NOTEBOOKS)
    assert all(python_blocks(p) for p in DOCS if p.name in {"getting-started.md", "concepts.md"})


@pytest.mark.parametrize("page", DOCS, ids=[p.stem for p in DOCS])
def test_doc_page_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each page's Python blocks run in order, in one namespace, from an empty directory;
    then again in a new interpreter in the same directory, as a reader runs a page a
    second time (what the first run wrote is still there)."""
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(page)
    # A module of its own, as a script's __main__ is: pydantic looks its classes' module
    # up in sys.modules (a generic such as BaseSpanHandler[MySpan] made in a block).
    module = types.ModuleType(f"docs_{page.stem.replace('-', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace: dict[str, object] = module.__dict__
    for number, code in enumerate(blocks, start=1):
        try:
            exec(compile(code, f"{page.name}[block {number}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the failure message is the point
            raise AssertionError(f"{page.name} block {number} failed: {exc!r}\n{code}") from exc
    again = subprocess.run(
        [sys.executable, "-c", _RUN_BLOCKS, page.name, str(namespace["__name__"])],
        input=json.dumps(blocks),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, f"{page.name} failed when run again:\n{again.stderr}"


#: Runs the blocks given as a JSON list on stdin, as test_doc_page_runs does.
_RUN_BLOCKS = """
import json, sys, types
page, name = sys.argv[1], sys.argv[2]
module = sys.modules[name] = types.ModuleType(name)
namespace = module.__dict__
for number, code in enumerate(json.load(sys.stdin), start=1):
    exec(compile(code, f"{page}[block {number}]", "exec"), namespace)
"""


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(notebook: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each notebook executes top to bottom with the project's own interpreter, twice in
    the same directory (a reader runs it again: what the first run wrote is there)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager  # noqa: F401 (nbclient dependency)

    env_python = sys.executable
    # The kernel inherits it; the debugger's frozen-modules warning is noise here.
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    for run in ("first", "second"):
        nb = nbformat.read(notebook, as_version=4)
        client = nbclient.NotebookClient(
            nb,
            timeout=240,
            kernel_name="python3",
            resources={"metadata": {"path": str(tmp_path)}},
        )
        # Run the kernel with this interpreter, whatever kernelspec the machine has.
        client.kernel_manager_class = _kernel_manager(env_python)
        client.execute()
        errors = [
            out
            for cell in nb.cells
            if cell.cell_type == "code"
            for out in cell.get("outputs", [])
            if out.get("output_type") == "error"
        ]
        assert not errors, f"{notebook.name}, {run} run: {errors}"


def _kernel_manager(python: str) -> type:
    from jupyter_client.manager import KernelManager

    class ThisPythonKernelManager(KernelManager):
        def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
            cmd = [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
            ns = {"connection_file": str(self.connection_file)}
            return [part.format(**ns) for part in cmd]

    return ThisPythonKernelManager
