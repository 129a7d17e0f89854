"""Draw spans as indented trees, for terminals and tests.

Used by :class:`SimpleSpanHandler` and by the storage command line, so that a trace
looks the same wherever it is read. A span whose parent is not among the spans given
(a parent in another process, or one evicted from a bounded buffer) becomes a root.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def build_forest(
    items: Iterable[T],
    id_of: Callable[[T], str],
    parent_of: Callable[[T], str | None],
    sort_key: Callable[[T], Any] | None = None,
) -> list[tuple[T, list[tuple[T, list]]]]:  # type: ignore[type-arg]
    """Nest ``items`` by parent id: a list of ``(item, children)`` pairs, recursively."""
    items = list(items)
    by_id = {id_of(item): item for item in items}
    children: dict[str, list[T]] = {}
    roots: list[T] = []
    for item in items:
        parent = parent_of(item)
        if parent is not None and parent in by_id and parent != id_of(item):
            children.setdefault(parent, []).append(item)
        else:
            roots.append(item)

    def nest(item: T, seen: frozenset[str]) -> tuple[T, list]:  # type: ignore[type-arg]
        kids = children.get(id_of(item), [])
        if sort_key is not None:
            kids = sorted(kids, key=sort_key)
        ident = id_of(item)
        return (item, [nest(k, seen | {ident}) for k in kids if id_of(k) not in seen])

    if sort_key is not None:
        roots.sort(key=sort_key)
    return [nest(r, frozenset()) for r in roots]


def render_forest(
    forest: Sequence[tuple[T, list]],  # type: ignore[type-arg]
    label: Callable[[T], str],
) -> str:
    """Draw a forest from :func:`build_forest` with box-drawing branches."""
    lines: list[str] = []

    def walk(node: tuple[T, list], prefix: str, last: bool, top: bool) -> None:  # type: ignore[type-arg]
        item, kids = node
        if top:
            lines.append(label(item))
            child_prefix = ""
        else:
            lines.append(f"{prefix}{'└── ' if last else '├── '}{label(item)}")
            child_prefix = prefix + ("    " if last else "│   ")
        for i, kid in enumerate(kids):
            walk(kid, child_prefix, i == len(kids) - 1, False)

    for root in forest:
        walk(root, "", True, True)
    return "\n".join(lines)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "open"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


__all__ = ["build_forest", "format_duration", "render_forest"]
