"""Several audit adapters seeing the same request span each get all of its events."""

from __future__ import annotations

from instrumentation import audit, get_dispatcher
from instrumentation.audit.collector import registry
from instrumentation.llms import ChatMessage, OfflineLLM

from .helpers import AsyncRecorder, SyncRecorder

llm = OfflineLLM()


def _chat(question: str) -> str:
    return str(llm.chat([ChatMessage(role="user", content=question)]).message.content)


def test_two_adapters_on_one_dispatcher_both_get_the_llm_events() -> None:
    d = get_dispatcher("tests.audit.shared")
    first, second = SyncRecorder(), AsyncRecorder()
    audit.attach(d, [first])
    audit.attach(d, [second])  # a CLI handler added later, say

    @d.span
    def step(question: str) -> str:
        return _chat(question)

    @d.span(request=True)
    def ask(question: str) -> str:
        return _chat(question) + step(question)  # directly, and in a sub-span

    ask("same span, two adapters?")
    for handler in (first, second):
        handler.rec.check(expected_requests=1, events_per_request=2)
        assert handler.rec.calls == ["request_start"] + ["event_start", "event_end"] * 2 + [
            "request_end"
        ]
    assert registry.span_runs == {} and registry.active == 0


def test_adapters_on_a_parent_and_a_child_dispatcher_both_get_the_llm_events() -> None:
    parent, child = get_dispatcher("tests.audit.org"), get_dispatcher("tests.audit.org.team")
    on_parent, on_child = SyncRecorder(), SyncRecorder()
    audit.attach(parent, [on_parent])
    audit.attach(child, [on_child])

    @child.span(request=True)
    def ask(question: str) -> str:
        return _chat(question)

    ask("parent and child?")
    for handler in (on_parent, on_child):
        handler.rec.check(expected_requests=1, events_per_request=1)
    assert registry.span_runs == {} and registry.active == 0


def test_nested_request_spans_with_two_adapters_keep_their_own_calls() -> None:
    d = get_dispatcher("tests.audit.shared.nested")
    first, second = SyncRecorder(), SyncRecorder()
    audit.attach(d, [first])
    audit.attach(d, [second])

    @d.span(request=True)
    def outer(question: str) -> str:
        return _chat(question) + inner("inner question") + _chat(question)

    @d.span(request=True)
    def inner(question: str) -> str:
        return _chat(question)

    outer("outer question")
    for handler in (first, second):
        rec = handler.rec
        by_request = {ctx.question: ctx for ctx in rec.returned_request.values()}
        assert set(by_request) == {"outer question", "inner question"}
        counts = {q: 0 for q in by_request}
        for request_ctx, _, event in rec.event_ends:
            assert request_ctx.question in str(getattr(event, "prompt", ""))
            counts[request_ctx.question] += 1
        assert counts == {"outer question": 2, "inner question": 1}


def test_a_request_span_inside_audit_request_takes_its_llm_calls_for_both_adapters() -> None:
    d = get_dispatcher("tests.audit.shared.manual")
    first, second, manual = SyncRecorder(), SyncRecorder(), SyncRecorder()
    audit.attach(d, [first])
    audit.attach(d, [second])

    @d.span(request=True)
    def ask(question: str) -> str:
        return _chat(question)

    with audit.request(question="by hand", handlers=[manual]):
        ask("span inside")
        _chat("by hand")
    for handler in (first, second):
        handler.rec.check(expected_requests=1, events_per_request=1)
    manual.rec.check(expected_requests=1, events_per_request=1)


def test_an_event_by_hand_inside_a_request_span_reaches_every_adapter() -> None:
    """audit.event() looked only for an audit.request() around it: inside a request
    span of attach() (no audit.request), the tool call was not recorded at all."""
    d = get_dispatcher("tests.audit.shared.by_hand")
    first, second = SyncRecorder(), SyncRecorder()
    audit.attach(d, [first])
    audit.attach(d, [second])

    @d.span(request=True)
    def ask(question: str) -> str:
        with audit.event(audit.ToolCallEvent(name="search")) as ev:
            ev.update(output=["a document"])
        return "answer"

    ask("by hand?")
    for handler in (first, second):
        handler.rec.check(expected_requests=1, events_per_request=1)
    assert registry.span_runs == {} and registry.active == 0
