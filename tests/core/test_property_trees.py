"""Property: for random call trees mixing sync, async (gather), thread and generator calls,
recorded parents equal the real tree.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instrumentation import SimpleSpanHandler, Thread, get_dispatcher

from ._support import Recorder, fresh

KINDS = ("sync", "async", "thread", "gen")

d = get_dispatcher(fresh("prop"))


@dataclass
class Node:
    kind: str
    children: list[Node] = field(default_factory=list)
    ident: int = -1


def _number(root: Node) -> list[Node]:
    out: list[Node] = []
    counter = itertools.count()

    def walk(n: Node) -> None:
        n.ident = next(counter)
        out.append(n)
        for c in n.children:
            walk(c)

    walk(root)
    return out


trees = st.recursive(
    st.builds(Node, st.sampled_from(KINDS)),
    lambda kids: st.builds(Node, st.sampled_from(KINDS), st.lists(kids, max_size=3)),
    max_leaves=10,
)


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_sync(node: Node) -> None:
    """Run ``node`` from synchronous code, whatever its kind."""
    if node.kind == "async":
        if _in_running_loop():  # a sync span inside a coroutine: finish the child elsewhere
            t = Thread(target=lambda: asyncio.run(async_node(node, node.ident)))
            t.start()
            t.join()
        else:
            asyncio.run(async_node(node, node.ident))
    elif node.kind == "gen":
        for _ in gen_node(node, node.ident):
            pass
    elif node.kind == "thread":
        thread_node(node, node.ident)
    else:
        sync_node(node, node.ident)


def run_children_sync(children: list[Node]) -> None:
    """Run children; generator children are advanced round-robin so their work interleaves."""
    gens = [gen_node(c, c.ident) for c in children if c.kind == "gen"]
    for c in children:
        if c.kind != "gen":
            run_sync(c)
    active = list(gens)
    while active:
        for g in list(active):
            try:
                next(g)
            except StopIteration:
                active.remove(g)


@d.span
def sync_node(node: Node, ident: int) -> None:
    run_children_sync(node.children)


@d.span
def thread_node(node: Node, ident: int) -> None:
    threads = [Thread(target=run_sync, args=(c,)) for c in node.children]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@d.span
def gen_node(node: Node, ident: int) -> Iterator[int]:
    yield -1  # first item before any work: the span must already be open and stay so
    for c in node.children:
        run_sync(c)
        yield c.ident


@d.span
async def async_node(node: Node, ident: int) -> None:
    async def one(c: Node) -> None:
        if c.kind == "async":
            await async_node(c, c.ident)
        else:
            await asyncio.to_thread(run_sync, c)

    await asyncio.gather(*(one(c) for c in node.children))


def _check(root: Node, spans: list[tuple[int, str, str | None, str | None, str]]) -> None:
    nodes = _number(root)
    expected_parent = {c.ident: n.ident for n in nodes for c in n.children}
    assert sorted(s[0] for s in spans) == [n.ident for n in nodes]
    by_span_id = {s[1]: s[0] for s in spans}
    for ident, _span_id, parent_id, _trace_id, status in spans:
        assert status == "exit"
        actual = None if parent_id is None else by_span_id[parent_id]
        assert actual == expected_parent.get(ident), (ident, actual, expected_parent.get(ident))
    assert len({s[3] for s in spans}) == 1


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_recorded_parents_equal_the_real_tree(root: Node) -> None:
    """Spans recorded by a bound-args handler reproduce the random tree exactly, in one trace."""
    _number(root)
    rec = Recorder()
    d.add_span_handler(rec)
    try:
        run_sync(root)
    finally:
        d.remove_span_handler(rec)
    spans = [
        (r.bound_args.arguments["ident"], r.id_, r.parent_id, r.trace_id, r.status)
        for r in rec.records.values()
    ]
    _check(root, spans)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_simple_span_handler_fast_path_agrees(root: Node) -> None:
    """SimpleSpanHandler's positional fast path records the tree's shape in one trace."""
    nodes = _number(root)
    h = SimpleSpanHandler()
    d.add_span_handler(h)
    try:
        run_sync(root)
    finally:
        d.remove_span_handler(h)
    assert h.open_spans == {} and len(h.completed_spans) == len(nodes)
    ids = {s.id_ for s in h.completed_spans}
    roots = [s for s in h.completed_spans if s.parent_id is None]
    assert len(roots) == 1 and all(
        s.parent_id in ids for s in h.completed_spans if s is not roots[0]
    )
    assert len({s.trace_id for s in h.completed_spans}) == 1
    fan_out = sorted(
        sum(1 for c in h.completed_spans if c.parent_id == s.id_) for s in h.completed_spans
    )
    assert fan_out == sorted(len(n.children) for n in nodes)
