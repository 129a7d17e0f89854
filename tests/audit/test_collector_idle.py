"""The collector stays on the root between requests, and goes once they stop.

Attaching or detaching it rebuilds the handler chain of every dispatcher in the
tree: when it came and went with each request, a request cost four full rebuilds
(20 ms with a thousand dispatchers, 200 ms with ten thousand).
"""

from __future__ import annotations

import time

import pytest

from instrumentation import audit, get_dispatcher, root_dispatcher
from instrumentation.audit import collector
from instrumentation.llms import ChatMessage, OfflineLLM
from instrumentation.span_handlers import SimpleSpanHandler

from .helpers import SyncRecorder


def test_back_to_back_requests_rebuild_no_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collector, "IDLE_DETACH_SECONDS", 60.0)
    # An application's own handler: every chain exists, whether the collector is on or not.
    root_dispatcher.add_span_handler(SimpleSpanHandler(max_completed_spans=10))
    unrelated = get_dispatcher("tests.audit.idle.unrelated")
    app = get_dispatcher("tests.audit.idle.app")
    adapter = audit.attach(app, [SyncRecorder()])

    @app.span(request=True)
    def ask(question: str) -> str:
        return str(llm.chat([ChatMessage(role="user", content=question)]).message.content)

    llm = OfflineLLM()
    handler = SyncRecorder()
    with audit.request(question="first", handlers=[handler]):
        pass
    chain = unrelated._hot
    assert chain is not None
    try:
        for i in range(20):
            with audit.request(question=f"question {i}", handlers=[handler]) as req:
                req.result = ask(f"question {i}")
            assert unrelated._hot is chain  # neither request rebuilt it
    finally:
        adapter.detach()
    handler.rec.check(expected_requests=21, events_per_request=0)


def test_the_collector_goes_once_no_request_was_open_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    delay = 0.5
    monkeypatch.setattr(collector, "IDLE_DETACH_SECONDS", delay)
    unrelated = get_dispatcher("tests.audit.idle.other")
    handler = SyncRecorder()
    with audit.request(question="one", handlers=[handler]):
        assert unrelated.is_listening
    assert unrelated.is_listening  # still there: the next request rebuilds nothing
    time.sleep(delay * 0.6)
    # A request open when the first check is due puts the detaching off.
    with audit.request(question="two", handlers=[handler]):
        time.sleep(delay * 0.6)
    ended = time.monotonic()
    assert unrelated.is_listening
    deadline = ended + 10
    while unrelated.is_listening and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not unrelated.is_listening
    assert time.monotonic() - ended >= delay * 0.9  # not before the delay ran out
    assert list(root_dispatcher.event_handlers) == []
    assert list(root_dispatcher.span_handlers) == []
    # And the next request attaches it again.
    llm = OfflineLLM()
    with audit.request(question="three", handlers=[handler]):
        llm.chat([ChatMessage(role="user", content="three")])
    assert len(handler.rec.event_ends) == 1
