"""docs/api.md and the modules' ``__all__`` agree: no public name goes undocumented,
and the page names nothing that is not there.

A module is public unless a part of its dotted name starts with ``_``; every public
module says what it exports (``__all__``, empty for the library's own modules). A
name re-exported elsewhere is the same object, documented once: under any module
that lists it.
"""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import re
import types
from pathlib import Path

import pytest

import instrumentation

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"

_SECTION = re.compile(r"^## `(instrumentation[\w.]*)`$", re.MULTILINE)
_ENTRY = re.compile(r"^- ((?:`\w+`,\s+)*`\w+`):", re.MULTILINE)
_LINK = re.compile(r"\]\(([\w.-]+\.md)(?:#([\w-]+))?\)")
_MODULE_NAMED = re.compile(r"`(instrumentation(?:\.\w+)*)`")
_DOTTED = re.compile(r"\binstrumentation(?:\.\w+)+")


def public_modules() -> dict[str, types.ModuleType]:
    names = ["instrumentation"] + [
        found.name
        for found in pkgutil.walk_packages(instrumentation.__path__, "instrumentation.")
        if not any(part.startswith("_") for part in found.name.split("."))
    ]
    return {name: importlib.import_module(name) for name in sorted(names)}


def exported(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    assert names is not None, f"{module.__name__} has no __all__"
    return list(names)


def documented() -> dict[str, list[str]]:
    """The names api.md lists, by the module whose section lists them."""
    text = API.read_text(encoding="utf-8")
    headings = list(_SECTION.finditer(text))
    assert headings, "docs/api.md has no '## `instrumentation...`' sections"
    sections: dict[str, list[str]] = {}
    for heading, following in zip(headings, [*headings[1:], None], strict=True):
        body = text[heading.end() : following.start() if following else len(text)]
        module = heading.group(1)
        assert module not in sections, f"two sections for {module} in docs/api.md"
        sections[module] = [
            name for entry in _ENTRY.findall(body) for name in re.findall(r"`(\w+)`", entry)
        ]
    return sections


def test_every_public_module_says_what_it_exports() -> None:
    """A module without ``__all__`` makes every name in it public by convention."""
    missing = [name for name, module in public_modules().items() if not hasattr(module, "__all__")]
    assert not missing, f"give these modules an __all__ (empty if nothing is public): {missing}"


def _found(module_name: str, name: str) -> tuple[str, int] | None:
    """What a name of api.md stands for, ``(name, id of the object)``; None if missing."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return (name, id(getattr(module, name))) if hasattr(module, name) else None


def test_every_public_name_is_documented() -> None:
    listed = {_found(module, name) for module, names in documented().items() for name in names}
    undocumented = [
        f"{module_name}.{name}"
        for module_name, module in public_modules().items()
        for name in exported(module)
        if (name, id(getattr(module, name))) not in listed
    ]
    assert not undocumented, (
        f"document these in docs/api.md (one line each, under their module), or take them "
        f"out of __all__ if they are the library's own: {undocumented}"
    )


def test_every_documented_name_is_public() -> None:
    modules = public_modules()
    wrong = []
    for module_name, names in documented().items():
        if module_name not in modules:
            wrong.append(f"section {module_name}: no such public module")
            continue
        public = exported(modules[module_name])
        wrong += [f"{module_name}.{name}" for name in names if name not in public]
    assert not wrong, f"docs/api.md lists what these modules do not export: {wrong}"


def test_every_name_is_documented_once() -> None:
    seen: dict[tuple[str, int] | None, str] = {}
    twice = []
    for module, names in documented().items():
        for name in names:
            key = _found(module, name)
            if key is not None and key in seen:
                twice.append(f"{name} under {seen[key]} and {module}")
            seen[key] = module
    assert not twice, f"one entry per name in docs/api.md: {twice}"


def test_every_module_with_public_names_is_named() -> None:
    """A reader looking for a module finds it: as a section, or where its names are."""
    named = set(_MODULE_NAMED.findall(API.read_text(encoding="utf-8")))
    unnamed = [
        name for name, module in public_modules().items() if exported(module) and name not in named
    ]
    assert not unnamed, f"say in docs/api.md where these modules' names are: {unnamed}"


def test_links_reach_a_page_and_a_heading() -> None:
    broken = []
    for page, anchor in _LINK.findall(API.read_text(encoding="utf-8")):
        target = API.parent / page
        if not target.exists():
            broken.append(page)
        elif anchor and anchor not in _anchors(target):
            broken.append(f"{page}#{anchor}")
    assert not broken, f"docs/api.md links to what is not there: {broken}"


def _anchors(page: Path) -> set[str]:
    """The ids GitHub gives the page's headings (outside code blocks)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    headings = re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def _reader_texts() -> dict[str, str]:
    """What users read and copy from: the docs, the README, the notebooks, the examples."""
    texts = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / "docs").glob("*.md")}
    texts["README.md"] = (ROOT / "README.md").read_text(encoding="utf-8")
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        code = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
        texts[notebook.name] = "".join(f"```python\n{cell}\n```\n" for cell in code)
    for example in (ROOT / "examples").glob("*.py"):
        texts[example.name] = f"```python\n{example.read_text(encoding='utf-8')}\n```\n"
    return texts


def _imports(text: str) -> list[tuple[str, str]]:
    """``(module, name)`` of every ``from instrumentation... import name`` in the text's
    Python blocks (shell and magic lines of notebooks left out)."""
    found = []
    for block in re.findall(r"^```python[^\n]*\n(.*?)^```", text, re.S | re.M):
        code = "\n".join(line for line in block.splitlines() if not line.startswith(("!", "%")))
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "instrumentation"
            ):
                found += [(node.module or "", alias.name) for alias in node.names]
    return found


def test_what_readers_are_shown_is_public() -> None:
    """Docs, notebooks and examples import, and name as ``instrumentation.x.NAME``,
    only names their module exports: what a reader copies must stay there."""
    modules = public_modules()
    private = []
    for source, text in _reader_texts().items():
        for module_name, name in _imports(text):
            module = modules.get(module_name)
            if module is None or f"{module_name}.{name}" in modules:
                continue  # a private module's name, or a module
            if name not in exported(module):
                private.append(f"{source}: from {module_name} import {name}")
        for dotted in _DOTTED.findall(text):
            module_name, _, name = dotted.rpartition(".")
            module = modules.get(module_name)
            value = getattr(module, name, None)
            if value is None or isinstance(value, types.ModuleType):
                continue  # no attribute (a logger's or a counter's name), or a module
            if name not in exported(modules[module_name]):
                private.append(f"{source}: {dotted}")
    assert not private, f"add these to their module's __all__ (and docs/api.md): {private}"


@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md"])
def test_api_reference_is_linked(page: str) -> None:
    assert "api.md" in (ROOT / page).read_text(encoding="utf-8")
