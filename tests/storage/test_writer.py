"""The batch writer: batching, flush and shutdown, full queues, bad values, failures."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from stopped_streams import stop_one_and_fail_one

from instrumentation import get_dispatcher, telemetry
from instrumentation.storage import (
    TRUNCATED,
    UNSERIALISABLE,
    BatchWriter,
    SQLiteStore,
    StorageHandler,
)
from instrumentation.storage.spool import Spool

from .helpers import (
    ControlledSQLiteStore,
    NoteEvent,
    count,
    locked_elsewhere,
    record_and_exit,
    wait_until,
)

d = get_dispatcher("tests.storage.writer")


def test_batch_is_written_when_batch_size_is_reached(tmp_path: Path, make_handler: Any) -> None:
    """A full batch is written at once; a smaller one waits for the debounce."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store, batch_size=5, debounce=30)
    for _ in range(4):
        handler.handle(NoteEvent())
    time.sleep(0.3)
    assert count(store, "events") == 0
    handler.handle(NoteEvent())
    assert wait_until(lambda: count(store, "events") == 5, 5)


def test_debounce_writes_a_partial_batch(tmp_path: Path, make_handler: Any) -> None:
    """Entries fewer than batch_size are written once debounce has passed."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store, batch_size=1000, debounce=0.2)
    started = time.monotonic()
    for _ in range(3):
        handler.handle(NoteEvent())
    assert wait_until(lambda: count(store, "events") == 3, 5)
    assert time.monotonic() - started >= 0.15


def test_one_transaction_per_batch(tmp_path: Path, make_handler: Any) -> None:
    """250 entries with batch_size 100 take three writes, not 250."""
    store = ControlledSQLiteStore(tmp_path / "t.db")
    store.gate.clear()  # hold the writer so the queue fills up
    handler = make_handler(store, batch_size=100, debounce=5)
    handler.handle(NoteEvent())
    for _ in range(249):
        handler.handle(NoteEvent())
    store.gate.set()
    assert handler.flush(10)
    assert count(store, "events") == 250
    assert store.attempts <= 4


def test_flush_covers_everything_queued_before_it(tmp_path: Path, make_handler: Any) -> None:
    """flush() returns True only after earlier entries are committed, without the debounce."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store, batch_size=10_000, debounce=60).attach(d)
    started = time.monotonic()
    for i in range(500):
        d.event(NoteEvent(text=str(i)))
    assert handler.flush(10)
    assert count(store, "events") == 500
    assert time.monotonic() - started < 30


def test_flush_times_out_false_while_the_database_blocks(tmp_path: Path, make_handler: Any) -> None:
    store = ControlledSQLiteStore(tmp_path / "t.db")
    store.gate.clear()
    handler = make_handler(store)
    handler.handle(NoteEvent())
    assert handler.flush(0.3) is False
    store.gate.set()
    assert handler.flush(10) is True


def test_shutdown_writes_the_queue_and_is_idempotent(tmp_path: Path, make_handler: Any) -> None:
    """shutdown() writes what is queued; a second call is harmless; later entries are counted."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store, batch_size=10_000, debounce=60)
    for _ in range(50):
        handler.handle(NoteEvent())
    assert handler.shutdown(10) is True
    assert count(store, "events") == 50
    assert handler.shutdown(10) is True
    handler.handle(NoteEvent())
    assert handler.dropped == 1 and telemetry.counter("storage.dropped").value == 1
    assert handler.flush(1) is True


def test_a_shutdown_that_cannot_wait_for_a_stuck_write_says_what_is_not_stored(
    tmp_path: Path, make_handler: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer is inside a write that does not return: shutdown() gives up after its
    timeout, and says how much is neither stored nor spooled (it said nothing, and at
    exit those entries were gone without a word)."""
    store = ControlledSQLiteStore(tmp_path / "t.db")
    store.gate.clear()
    handler = make_handler(store, batch_size=1)
    handler.handle(NoteEvent())
    assert wait_until(lambda: store.attempts == 1)
    for _ in range(3):
        handler.handle(NoteEvent())
    with caplog.at_level(logging.WARNING, logger="instrumentation.storage"):
        assert handler.writer.shutdown(timeout=0.3) is False
    assert "did not stop within 0.3 s" in caplog.text
    assert "3 queued entries and the 1 being written" in caplog.text
    store.gate.set()


def test_a_database_that_hangs_during_shutdown_loses_nothing_queued(
    tmp_path: Path, spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that takes connections and never answers, while rows wait in the spool:
    at shutdown each batch tried a replay first, which hung for the connect timeout,
    and what was still queued when shutdown gave up was lost (44,000 of 90,000 rows in
    the reviewer's run). Once shutdown has begun, the rest goes to the spool at once;
    the one replay left says, when it cannot finish, that nothing is lost."""
    from instrumentation.storage.serialise import RowMaker

    store = ControlledSQLiteStore(tmp_path / "t.db")
    store.fail = True
    maker = RowMaker({}, {}, 10_000)
    rows = [maker.event_row(NoteEvent(text=str(i)), None) for i in range(40)]
    hold, inside, release = threading.Event(), threading.Event(), threading.Event()

    def rows_of(entries: list[Any]) -> tuple[list[Any], list[Any]]:
        if hold.is_set():  # the writer is busy here while entries queue up behind it
            inside.set()
            release.wait(30)
        return [], list(entries)

    writer = BatchWriter(
        store,
        rows_of,
        batch_size=5,
        debounce=0.01,
        retry_for=0,
        replay_interval=0.05,
        spool_dir=spool_dir,
    )
    writer.put(rows[0])
    assert wait_until(lambda: writer.spool.pending, 10)  # the database failed: spooled
    hold.set()
    writer.put(rows[1])
    assert inside.wait(10)
    for row in rows[2:]:
        writer.put(row)
    time.sleep(0.1)  # a replay is due
    store.on_write = store.gate.clear  # from now on the database never answers
    answers: list[bool] = []
    with caplog.at_level(logging.WARNING, logger="instrumentation.storage"):
        stopping = threading.Thread(target=lambda: answers.append(writer.shutdown(timeout=1.0)))
        stopping.start()
        assert wait_until(lambda: writer._closed, 10)
        release.set()
        stopping.join(10)
    try:
        assert answers == [False]
        assert writer.spool.rows_pending == 40
        assert "nothing is lost" in caplog.text and "being written" not in caplog.text
    finally:
        store.gate.set()


def test_dispatcher_shutdown_closes_the_handler(tmp_path: Path, make_handler: Any) -> None:
    """Dispatcher.shutdown() drops open spans into the store and stops the writer."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store).attach(d)
    with d.span("left-open"):
        d.shutdown()
    assert handler.writer._stopped.is_set()
    spans = store.trace(store.traces()[0].trace_id)
    assert spans[0].status == "error" and "shut down" in (spans[0].error or "")


def test_drop_newest_counts_and_logs(
    tmp_path: Path, make_handler: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """With on_full='drop_newest' a full queue refuses at once, counted and logged."""
    store = ControlledSQLiteStore(tmp_path / "t.db")
    store.gate.clear()
    handler = make_handler(store, max_queue=5, batch_size=1, on_full="drop_newest")
    handler.handle(NoteEvent())
    assert wait_until(lambda: store.attempts == 1)  # the writer holds one, waiting
    with caplog.at_level(logging.WARNING, logger="instrumentation.storage"):
        started = time.monotonic()
        for _ in range(20):
            handler.handle(NoteEvent())
        # Not a speed test: waiting block_timeout (1 s) per drop would take 15 s.
        assert time.monotonic() - started < 5
    assert handler.dropped == 15
    assert telemetry.counter("storage.dropped").value == 15
    assert any("queue is full" in r.getMessage() for r in caplog.records)
    store.gate.set()
    assert handler.flush(10)
    assert count(store, "events") == 6
    # Only the first drop was logged (rate limit); shutdown logs the other 14.
    with caplog.at_level(logging.WARNING, logger="instrumentation.storage"):
        caplog.clear()
        handler.shutdown()
    assert any(
        "dropped 14 more entries" in r.getMessage() and "15 dropped in all" in r.getMessage()
        for r in caplog.records
    )


def test_the_drop_event_of_a_generator_closed_early_takes_no_place_in_the_queue(
    tmp_path: Path, make_handler: Any
) -> None:
    """The drop event of a generator its caller stopped reading is never stored (its
    span is stored as ok): it is not queued either, so a full queue does not count it
    as dropped, and storage.dropped counts only what was to be stored and was not."""

    @d.span
    def rows() -> Any:
        yield 1
        yield 2

    store = ControlledSQLiteStore(tmp_path / "t.db")
    store.gate.clear()
    handler = make_handler(store, max_queue=1, batch_size=1, on_full="drop_newest").attach(d)
    handler.handle(NoteEvent())
    assert wait_until(lambda: store.attempts == 1)  # the writer holds one, waiting
    handler.handle(NoteEvent())  # the queue is full now
    for _ in range(3):
        for _ in rows():
            break
    assert handler.dropped == 0  # the roots are set aside; nothing else was to be stored
    assert telemetry.counter("storage.dropped").value == 0
    store.gate.set()
    assert handler.flush(10)
    assert count(store, "spans") == 3 and count(store, "events") == 2
    assert {s.status for s in store.traces()} == {"ok"}


def test_a_root_span_refused_by_a_full_queue_is_set_aside_so_its_trace_is_listed(
    tmp_path: Path, make_handler: Any
) -> None:
    """The queue fills inside a traced call: the children's rows are dropped or kept,
    but the root, set aside, is stored, and the trace is listed with what was kept (a
    dropped root hid the whole trace from list and tail: its children are no roots)."""
    store = ControlledSQLiteStore(tmp_path / "t.db")
    store.gate.clear()
    handler = make_handler(store, max_queue=3, batch_size=1, on_full="drop_newest").attach(d)
    handler.handle(NoteEvent())
    assert wait_until(lambda: store.attempts == 1)  # the writer holds one, waiting
    with d.span("request"):
        for _ in range(6):
            with d.span("step"):
                pass
    assert handler.dropped == 3  # three steps fit the queue, three did not; the root did
    assert handler.writer.queued == 4
    store.gate.set()
    assert handler.flush(10)
    (listed,) = store.traces()
    assert listed.name == "request" and listed.span_count == 4
    names = sorted(span.name for span in store.trace(listed.trace_id))
    assert names == ["request", "step", "step", "step"]
    assert handler.dropped == 3


def test_roots_set_aside_are_bounded_and_flushed_before_a_later_marker(
    tmp_path: Path, make_handler: Any
) -> None:
    """At most 1,000 roots wait aside (beyond that they are dropped and counted), and
    flush() returns only once those set aside before it are stored."""
    store = ControlledSQLiteStore(tmp_path / "t.db")
    store.gate.clear()
    handler = make_handler(store, max_queue=1, batch_size=1, on_full="drop_newest").attach(d)
    handler.handle(NoteEvent())
    assert wait_until(lambda: store.attempts == 1)
    handler.handle(NoteEvent())  # the queue is full now
    for _ in range(1_005):
        with d.span("request"):
            pass
    assert handler.dropped == 5
    store.gate.set()
    assert handler.flush(10)
    assert count(store, "spans") == 1_000
    assert len(store.traces(limit=2_000)) == 1_000


def test_block_waits_for_space_then_drops_after_the_timeout(
    tmp_path: Path, make_handler: Any
) -> None:
    """With on_full='block' the caller waits up to block_timeout for room, once: while
    the writer stays stuck, the entries after a wait in vain are dropped at once (a
    traced call of 20 spans and events was held up 20 times block_timeout). Once the
    writer makes room, a full queue is waited for again."""
    store = ControlledSQLiteStore(tmp_path / "t.db")
    store.gate.clear()
    handler = make_handler(store, max_queue=2, batch_size=1, block_timeout=0.3)
    handler.handle(NoteEvent())
    assert wait_until(lambda: store.attempts == 1)
    handler.handle(NoteEvent())
    handler.handle(NoteEvent())
    started = time.monotonic()
    handler.handle(NoteEvent())  # no room: waits 0.3 s, then drops
    assert 0.25 <= time.monotonic() - started < 2
    assert handler.dropped == 1
    started = time.monotonic()
    for _ in range(20):
        handler.handle(NoteEvent())
    assert time.monotonic() - started < 3  # 6 s when each waited
    assert handler.dropped == 21
    store.gate.set()
    assert handler.flush(10)
    # Room was made: a full queue is waited for again, and room appearing while it
    # waits lets the entry in.
    store.gate.clear()
    handler.handle(NoteEvent())
    assert wait_until(lambda: store.attempts == 4)
    handler.handle(NoteEvent())
    handler.handle(NoteEvent())
    handler.writer.block_timeout = 5.0
    threading.Timer(0.2, store.gate.set).start()
    started = time.monotonic()
    handler.handle(NoteEvent())
    assert 0.15 <= time.monotonic() - started < 4
    assert handler.dropped == 21
    assert handler.flush(10)
    assert count(store, "events") == 7


def test_unserialisable_values_become_marked_reprs(tmp_path: Path, make_handler: Any) -> None:
    """A value json cannot take is stored as its repr with a marker; the row is kept."""

    class Odd:
        def __repr__(self) -> str:
            return "<Odd thing>"

    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store).attach(d)
    d.event(NoteEvent(value=Odd(), tags={"obj": Odd()}))
    with d.span("tagged", tags={"weird": Odd()}):
        pass
    assert handler.flush(10)
    (event,) = store.events()
    assert event.payload["value"]["repr"] == "<Odd thing>"
    assert event.payload["value"][UNSERIALISABLE].endswith(".Odd")
    assert event.payload["tags"]["obj"]["repr"] == "<Odd thing>"
    (span,) = store.trace(store.traces()[0].trace_id)
    assert span.tags["weird"]["repr"] == "<Odd thing>"
    assert span.tags["weird"][UNSERIALISABLE].endswith(".Odd")
    assert telemetry.counter("storage.unserialisable_values").value >= 2


def test_a_lone_surrogate_or_a_value_that_holds_itself_costs_only_itself(
    tmp_path: Path, make_handler: Any
) -> None:
    """Text with a lone surrogate (decoded with surrogateescape) is stored with U+FFFD in
    its place, not refused with its whole row; a list that holds itself becomes a
    marker, and the event's other fields stay readable."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store)
    looped: list[Any] = [1]
    looped.append(looped)
    handler.handle(NoteEvent(text="bad \ud800 text"))
    handler.handle(NoteEvent(text="kept", value=looped))
    handler.handle(NoteEvent(text="plain"))
    assert handler.flush(10)
    by_text = {e.payload["text"]: e.payload for e in store.events()}
    assert set(by_text) == {"bad \ufffd text", "kept", "plain"}
    assert by_text["kept"]["value"][UNSERIALISABLE] == "list"
    # The same keys as any event's payload (the class has a column of its own).
    assert set(by_text["bad \ufffd text"]) == set(by_text["kept"]) == set(by_text["plain"])
    assert telemetry.counter("storage.rejected_rows").value == 0


@pytest.mark.timeout(30)
def test_a_value_holding_itself_twice_is_a_marker_at_once(
    tmp_path: Path, make_handler: Any
) -> None:
    """``x = [x, x]`` never reached the database: NaN-cleaning copied it anew at each of
    its places, 2**100 copies deep, and the writer thread hung on it (every later row
    with it). A container met twice is copied once; one with NaN in two places is
    still cleaned in both."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store)
    twice: list[Any] = []
    twice += [twice, twice]
    shared = [1.5, float("nan")]
    handler.handle(NoteEvent(text="looped", value=twice))
    handler.handle(NoteEvent(text="shared", value={"a": shared, "b": shared}))
    assert handler.flush(10)
    by_text = {e.payload["text"]: e.payload for e in store.events()}
    assert by_text["looped"]["value"][UNSERIALISABLE] == "list"
    assert by_text["shared"]["value"] == {"a": [1.5, None], "b": [1.5, None]}


def test_large_payloads_are_truncated_with_a_marker(tmp_path: Path, make_handler: Any) -> None:
    """The largest fields of an event too long to store give way to markers, one at a
    time, until it fits: the rest of the event is kept as it was."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store, max_payload_chars=1000)
    handler.handle(NoteEvent(text="x" * 50_000, tags={"user": "u1", "doc": "d" * 3000}))
    handler.handle(NoteEvent(text="small"))
    assert handler.flush(10)
    big, small = sorted(store.events(), key=lambda e: len(json.dumps(e.payload)), reverse=True)
    text = big.payload["text"]
    assert text[TRUNCATED] is True and text["original_chars"] == 50_000
    assert text["preview"] == "x" * len(text["preview"])
    assert big.payload["tags"] == {"user": "u1", "doc": "d" * 3000} or (
        big.payload["tags"][TRUNCATED] is True
    )
    assert len(json.dumps(big.payload, separators=(",", ":"))) <= 1000
    assert small.payload["text"] == "small"


def test_a_streamed_chunk_is_stored_without_what_its_call_holds(
    tmp_path: Path, make_handler: Any
) -> None:
    """Each chunk event of a stream repeats the messages (or prompt) and the answer so
    far: stored whole, a stream of n chunks kept n copies of the prompt and a square
    of the answer. A chunk's payload keeps its delta (and the rest of its response);
    the start event has the messages, the end event the whole answer."""
    from instrumentation.llms import ChatMessage, OfflineLLM

    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store)
    d = get_dispatcher()  # the LLM events come from the library's own dispatchers
    d.add_event_handler(handler)
    try:
        llm = OfflineLLM(answers=["one two three"])
        prompt = "context " * 500
        chat = "".join(c.delta or "" for c in llm.stream_chat([ChatMessage(content=prompt)]))
        text = "".join(c.delta or "" for c in llm.stream_complete(prompt))
    finally:
        d.remove_event_handler(handler)
    assert handler.flush(10)
    by_type: dict[str, list[Any]] = {}
    for event in store.events():
        by_type.setdefault(event.type, []).append(event.payload)
    chunks = by_type["LLMChatInProgressEvent"]
    assert "".join(c["response"]["delta"] for c in chunks) == chat == "one two three"
    assert all("messages" not in c and "message" not in c["response"] for c in chunks)
    assert all(c["model"] == "offline" for c in chunks)
    pieces = by_type["LLMCompletionInProgressEvent"]
    assert "".join(p["response"]["delta"] for p in pieces) == text
    assert all("prompt" not in p and "text" not in p["response"] for p in pieces)
    (start,) = by_type["LLMChatStartEvent"]
    assert start["messages"][0]["content"] == prompt
    (end,) = by_type["LLMChatEndEvent"]
    assert end["response"]["message"]["content"] == chat
    (done,) = by_type["LLMCompletionEndEvent"]
    assert done["prompt"] == prompt and done["response"]["text"] == text


def test_a_payload_of_many_small_fields_too_long_is_one_marker(
    tmp_path: Path, make_handler: Any
) -> None:
    """When no field is large, markers would not help: the payload as a whole is
    replaced, its start kept as the preview."""
    from pydantic import create_model

    from instrumentation import BaseEvent

    wide: Any = create_model(
        "WideEvent", __base__=BaseEvent, **{f"field_{i}": (int, i) for i in range(200)}
    )
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store, max_payload_chars=300)
    handler.handle(wide())
    assert handler.flush(10)
    (event,) = store.events()
    assert event.payload[TRUNCATED] is True and event.payload["original_chars"] > 1000
    assert event.payload["preview"].startswith("{")
    # Its preview is JSON text, escaped again (every quote twice as long): it still fits.
    assert len(json.dumps(event.payload, separators=(",", ":"), ensure_ascii=False)) <= 300


@pytest.mark.parametrize(
    "text",
    [
        "line of a document\n" * 4000,
        'say "hi" ' * 9000,
        json.dumps([{"k": "v"}] * 8000),
        "\x01\x02 control" * 6000,
    ],
    ids=["newlines", "quotes", "json", "control-characters"],
)
def test_a_long_field_that_escapes_long_leaves_the_others(
    tmp_path: Path, make_handler: Any, text: str
) -> None:
    """A prompt whose characters grow when escaped (newlines, quotes, JSON, control
    characters) costs the event only that field, as plain text does: its preview was
    cut by counting characters, came out too long, and the whole payload was replaced."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store, max_payload_chars=2000)
    handler.handle(NoteEvent(text=text, tags={"user": "u1"}))
    assert handler.flush(10)
    (event,) = store.events()
    assert event.payload["tags"] == {"user": "u1"}
    marker = event.payload["text"]
    assert marker[TRUNCATED] is True and marker["original_chars"] == len(text)
    assert text.startswith(marker["preview"]) and len(marker["preview"]) > 100
    # It fits, and the preview takes most of the room (cut to what fits, not far below).
    assert 1600 < len(json.dumps(event.payload, separators=(",", ":"), ensure_ascii=False)) <= 2000


def test_one_long_field_leaves_the_others(tmp_path: Path, make_handler: Any) -> None:
    """A long prompt in an event costs the event only that field."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store, max_payload_chars=2000)
    handler.handle(NoteEvent(text="p" * 70_000, tags={"user": "u1"}))
    assert handler.flush(10)
    (event,) = store.events()
    assert event.payload["tags"] == {"user": "u1"}
    assert event.payload["text"]["original_chars"] == 70_000
    assert len(event.payload["text"]["preview"]) > 1000


def test_the_writer_never_traces_itself(tmp_path: Path, make_handler: Any) -> None:
    """Spans and events made during the writer's own database calls are suppressed."""
    store = ControlledSQLiteStore(tmp_path / "t.db")
    inner = get_dispatcher("tests.storage.dbclient")

    @inner.span
    def instrumented_client_call() -> None:
        inner.event(NoteEvent(text="from the db client"))

    calls: list[int] = []

    def client_call_in_write() -> None:
        calls.append(1)
        instrumented_client_call()

    store.on_write = client_call_in_write
    handler = make_handler(store).attach()
    d.event(NoteEvent(text="app"))
    assert handler.flush(10)
    assert calls  # the client was called inside the writer's write
    # Anything it handed the handler was queued before this flush: it covers it.
    assert handler.flush(10)
    assert [e.payload["text"] for e in store.events()] == ["app"]
    assert store.traces() == []
    # The same call made by the application is recorded: the handler does see it.
    instrumented_client_call()
    assert handler.flush(10) and handler.flush(10)
    assert sorted(e.payload["text"] for e in store.events()) == ["app", "from the db client"]
    (trace,) = store.traces()
    assert trace.name == instrumented_client_call.__qualname__


def test_failed_writes_are_retried_then_spooled_then_replayed_once(
    tmp_path: Path, make_handler: Any, spool_dir: Path
) -> None:
    """A failing database: retry with backoff, spool, replay when back; each row once."""
    store = ControlledSQLiteStore(tmp_path / "t.db")
    store.fail = True
    handler = make_handler(store, retry_for=0.2, retry_backoff=0.02, replay_interval=0.1)
    for i in range(30):
        handler.handle(NoteEvent(text=str(i)))
    assert handler.flush(0.5) is False  # not in the database: spooled
    assert wait_until(lambda: handler.writer.spool.pending)
    assert store.attempts >= 3  # retried before spooling
    for i in range(30, 40):
        handler.handle(NoteEvent(text=str(i)))
    store.fail = False
    assert wait_until(lambda: handler.flush(1), 10)
    texts = sorted(int(e.payload["text"]) for e in store.events())
    assert texts == list(range(40))
    assert not handler.writer.spool.path.exists()
    assert telemetry.counter("storage.replayed_rows").value >= 30


def test_flush_is_false_when_rows_waiting_for_it_were_lost(
    tmp_path: Path, make_handler: Any
) -> None:
    """The database fails and the spool cannot be written: the rows are lost, counted,
    and flush() says so instead of reporting success."""
    store = ControlledSQLiteStore(tmp_path / "t.db")
    store.fail = True
    spool_dir = tmp_path / "spool-then-a-file"
    handler = make_handler(store, retry_for=0.1, retry_backoff=0.02, spool_dir=str(spool_dir))
    spool_dir.rmdir()  # a folder when the handler was made (it is checked), a file now
    spool_dir.write_text("")
    for i in range(10):
        handler.handle(NoteEvent(text=str(i)))
    assert handler.flush(5) is False
    assert handler.writer.rows_lost == 10
    assert telemetry.counter("storage.lost_rows").value == 10
    store.fail = False
    handler.handle(NoteEvent(text="later"))
    assert handler.flush(5) is True  # a later flush covers only what came after
    assert [e.payload["text"] for e in store.events()] == ["later"]
    store.fail = True
    handler.handle(NoteEvent(text="lost at shutdown"))
    assert handler.shutdown(5) is False
    assert handler.flush(1) is False  # after shutdown, flush keeps shutdown's answer


def test_a_database_locked_when_the_application_starts_does_not_hold_it_up(
    tmp_path: Path, make_handler: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holds the SQLite lock as the store is made: it is made at once,
    and the rows arrive when the lock is released. Being busy is no warning (processes
    starting together met it): it is noted at INFO, and counted."""
    path = tmp_path / "t.db"
    SQLiteStore(path).close()
    with locked_elsewhere(path):
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="instrumentation.storage"):
            store = SQLiteStore(path, busy_timeout=5)
        assert time.monotonic() - started < 3  # not the whole busy_timeout
        assert telemetry.counter("storage.connect_errors").value == 1
        assert [r.levelname for r in caplog.records] == ["INFO"]
        assert "is busy (database is locked)" in caplog.text
        handler = make_handler(store, retry_for=0.1, retry_backoff=0.02, replay_interval=0.1)
        handler.handle(NoteEvent(text="while locked"))
        # Connecting waits within retry_for too, not the store's busy_timeout (5 s).
        spooled = telemetry.counter("storage.spooled_rows")
        assert wait_until(lambda: spooled.value == 1, 3)
        assert handler.flush(0.2) is False
    assert wait_until(lambda: handler.flush(1), 15)
    assert [e.payload["text"] for e in store.events()] == ["while locked"]


def test_a_lock_held_elsewhere_is_waited_for_no_longer_than_retry_for(
    tmp_path: Path, make_handler: Any
) -> None:
    """With the file locked by another connection, a batch goes to the spool once
    retry_for is over: each attempt waited the store's whole busy_timeout (10 s) before,
    twice retry_for here. Afterwards the store waits its busy_timeout again."""
    path = tmp_path / "t.db"
    store = SQLiteStore(path, busy_timeout=4)
    handler = make_handler(store, retry_for=0.3, retry_backoff=0.05, replay_interval=0.1)
    with locked_elsewhere(path):
        handler.handle(NoteEvent(text="while locked"))
        spooled = telemetry.counter("storage.spooled_rows")
        assert wait_until(lambda: spooled.value == 1, 3)  # well before busy_timeout
        (timeout_ms,) = store._query("PRAGMA busy_timeout", [])[0]
        assert timeout_ms == 4000
    assert wait_until(lambda: handler.flush(1), 15)
    assert [e.payload["text"] for e in store.events()] == ["while locked"]


def test_a_short_lock_elsewhere_is_waited_for_even_with_retry_for_0(
    tmp_path: Path, make_handler: Any
) -> None:
    """Another writer's turn (a lock held a moment) is no failure: with retry_for=0 the
    batch still waits for it, and is written, not spooled."""
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    handler = make_handler(store, retry_for=0, replay_interval=3600)
    with locked_elsewhere(path) as locker:
        threading.Timer(0.3, locker.execute, ("ROLLBACK",)).start()
        handler.handle(NoteEvent(text="after a moment"))
        assert handler.flush(10)
    assert telemetry.counter("storage.spooled_rows").value == 0
    assert [e.payload["text"] for e in store.events()] == ["after a moment"]


def test_a_short_shutdown_with_the_database_locked_spools_in_time(
    tmp_path: Path, make_handler: Any
) -> None:
    """Shutting down, a write or a replay waits a moment only for a lock held
    elsewhere, so that what is queued reaches the spool within shutdown's timeout (a
    replay waited the store's whole busy_timeout, a write a full second)."""
    path = tmp_path / "t.db"
    store = SQLiteStore(path, busy_timeout=10)
    handler = make_handler(store, retry_for=0, debounce=30, replay_interval=0.01)
    with locked_elsewhere(path):
        handler.handle(NoteEvent(text="spooled before"))
        assert handler.flush(3) is False  # written now, not in 30 s: spooled
        assert handler.writer.spool.pending
        handler.handle(NoteEvent(text="queued at shutdown"))
        started = time.monotonic()
        assert handler.writer.shutdown(timeout=1.0) is False
        assert time.monotonic() - started < 1.2
        assert telemetry.counter("storage.spooled_rows").value == 2


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_database_file_removed_or_replaced_while_open_is_noticed(
    tmp_path: Path, make_handler: Any, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """Rows went on into the removed file, which no one can read, with flush() True and
    nothing said. Now the next write notices, says so, and writes to the file at the
    path (made afresh when it is gone)."""
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    handler = make_handler(store)
    handler.handle(NoteEvent(text="before"))
    assert handler.flush(10)
    if how == "removed":
        for suffix in ("", "-wal", "-shm"):
            os.remove(f"{path}{suffix}")
    else:  # rotated: moved away with its -wal and -shm, and a new database put there
        for suffix in ("", "-wal", "-shm"):
            os.replace(f"{path}{suffix}", f"{path}.old{suffix}")
        SQLiteStore(path).close()
    with caplog.at_level(logging.WARNING, logger="instrumentation.storage"):
        handler.handle(NoteEvent(text="after"))
        assert handler.flush(10)
    assert f"was {how} while open" in caplog.text
    assert telemetry.counter("storage.database_file_replaced").value == 1
    with SQLiteStore(path, read_only=True) as reader:
        assert [e.payload["text"] for e in reader.events()] == ["after"]


def test_a_path_that_cannot_be_opened_is_still_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-dir' does not exist"):
        SQLiteStore(tmp_path / "no-such-dir" / "t.db")
    for bad in (float("inf"), -1, 10**9):
        with pytest.raises(ValueError, match="busy_timeout"):
            SQLiteStore(tmp_path / "t.db", busy_timeout=bad)
    with pytest.raises(TypeError, match="busy_timeout"):
        SQLiteStore(tmp_path / "t.db", busy_timeout="10")  # type: ignore[arg-type]


def test_spool_of_a_dead_process_is_replayed(
    tmp_path: Path, make_handler: Any, spool_dir: Path
) -> None:
    """Rows spooled by a process that died are adopted and written by the next writer."""
    store = SQLiteStore(tmp_path / "t.db")
    from instrumentation.storage.serialise import RowMaker

    rows = [RowMaker({}, {}, 10_000).event_row(NoteEvent(text=f"old{i}"), None) for i in range(3)]
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan = Spool(store.spool_key, spool_dir)
    orphan.directory.mkdir(parents=True)
    own_path = orphan.path
    orphan.append([], rows)
    own_path.rename(own_path.with_name(f"{orphan.prefix}-{int(dead.stdout)}.jsonl"))
    handler = make_handler(store)
    assert wait_until(lambda: count(store, "events") == 3, 10)
    assert sorted(e.payload["text"] for e in store.events()) == ["old0", "old1", "old2"]
    assert handler.flush(5)
    assert list(spool_dir.glob("*")) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_a_writer_of_its_own(tmp_path: Path, make_handler: Any) -> None:
    """After os.fork the child's entries are written by the child's own writer thread."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store).attach(d)
    d.event(NoteEvent(text="parent-before"))
    assert handler.flush(10)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            d.event(NoteEvent(text="child"))
            with d.span("child-span"):
                pass
            code = 0 if handler.flush(10) else 3
        finally:
            os._exit(code)
    d.event(NoteEvent(text="parent-after"))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert handler.flush(10)
    texts = sorted(e.payload["text"] for e in store.events())
    assert texts == ["child", "parent-after", "parent-before"]
    assert [s.name for s in store.traces()] == ["child-span"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_in_the_middle_of_a_write_leaves_the_child_able_to_write(
    tmp_path: Path, make_handler: Any
) -> None:
    """fork() waits for a store's statement in progress: forked in the middle of the
    parent's transaction, the child found the file locked for good, and its rows never
    reached the database."""
    in_transaction, go_on = threading.Event(), threading.Event()

    class PausingStore(SQLiteStore):
        def write(self, spans: Any, events: Any) -> None:
            with self._lock:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
                in_transaction.set()
                go_on.wait(10)
                conn.execute("COMMIT")
            super().write(spans, events)

    store = PausingStore(tmp_path / "t.db")
    handler = make_handler(store).attach(d)
    d.event(NoteEvent(text="parent"))
    assert in_transaction.wait(10)
    threading.Timer(0.3, go_on.set).start()  # the write goes on while fork() waits
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            go_on.set()
            d.event(NoteEvent(text="child"))
            code = 0 if handler.flush(5) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert handler.flush(10)
    assert sorted(e.payload["text"] for e in store.events()) == ["child", "parent"]


@pytest.mark.timeout(30)
def test_two_forks_at_once_each_let_go_of_the_store_locks_they_took(tmp_path: Path) -> None:
    """Two threads fork at once, the first slowly (another library's before-fork hook):
    the second, whose wait for the store's lock timed out, released (from its thread)
    the lock the first held, or the first found its list emptied and never let go:
    every later write waited for ever."""
    from instrumentation.storage import base as storage_base

    store = SQLiteStore(tmp_path / "t.db")
    first_holds, second_done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run(steps: Any) -> None:
        try:
            steps()
        except BaseException as exc:  # pragma: no cover - the failure being checked
            errors.append(exc)

    def first() -> None:
        storage_base._before_fork()
        first_holds.set()
        assert second_done.wait(10)
        storage_base._after_fork_in_parent()

    def second() -> None:
        assert first_holds.wait(10)
        storage_base._before_fork()  # waits for the lock the first holds, and gives up
        second_done.set()
        storage_base._after_fork_in_parent()

    threads = [threading.Thread(target=run, args=(f,)) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == []
    free = store._lock.acquire(timeout=2)
    if free:
        store._lock.release()
    assert free
    assert storage_base._held_at_fork == {}
    store.close()


def _note_and_return() -> None:
    for i in range(50):
        d.event(NoteEvent(text=f"child {i}"))


def _record_in_the_child(path: str) -> None:
    from instrumentation.storage import StorageHandler

    store = SQLiteStore(path)
    StorageHandler(store=store, debounce=30, batch_size=10_000).attach(d)
    _note_and_return()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_writer_made_in_a_multiprocessing_child_writes_when_it_ends(tmp_path: Path) -> None:
    """The same for a writer the child made itself (in its target or a Pool
    initializer): the child's finalizers were cleared before it was made."""
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(
        target=_record_in_the_child, args=(str(tmp_path / "t.db"),)
    )
    child.start()
    child.join(30)
    assert child.exitcode == 0
    with SQLiteStore(tmp_path / "t.db", read_only=True) as reader:
        assert len(reader.events(limit=None)) == 50


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_multiprocessing_child_writes_what_it_queued_when_it_ends(
    tmp_path: Path, make_handler: Any
) -> None:
    """A multiprocessing child ends with os._exit, which runs no atexit: what its writer
    still held was lost (here all of it: the writer waits 30 s before a write)."""
    import multiprocessing

    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store, debounce=30, batch_size=10_000).attach(d)
    child = multiprocessing.get_context("fork").Process(target=_note_and_return)
    child.start()
    child.join(30)
    assert child.exitcode == 0
    with SQLiteStore(tmp_path / "t.db", read_only=True) as reader:
        assert len(reader.events(limit=None)) == 50
    handler.detach()


def test_queued_entries_are_written_at_interpreter_exit(tmp_path: Path) -> None:
    """A program that never flushes still has its entries stored (atexit)."""
    db = tmp_path / "exit.db"
    record_and_exit(db, 200, events=True)
    store = SQLiteStore(db)
    assert count(store, "spans") == 200 and count(store, "events") == 200


@pytest.mark.skipif(not hasattr(os, "kill"), reason="needs signals")
@pytest.mark.parametrize("previous", ["default", "own handler"])
def test_flush_on_sigterm_makes_sigterm_an_orderly_exit(tmp_path: Path, previous: str) -> None:
    """SIGTERM with Python's default ends the process at once, no atexit: the queue was
    lost. With flush_on_sigterm() it is an orderly exit (status 143) that writes the
    queue, also when SIGTERM arrives while the main thread is inside the library with a
    full queue (a flush inside the handler deadlocked there). A handler of the
    application's own stays in charge: here it keeps the process running, and recording
    goes on."""
    db = tmp_path / "t.db"
    own = (
        "signal.signal(signal.SIGTERM, lambda *a: (print('own handler'), stop.append(1)))"
        if previous == "own handler"
        else ""
    )
    script = f"""
import atexit, os, signal, sys, threading, time
calls = [0]
stop = []
# Registered first, so it runs last: after the storage's own exit flush.
atexit.register(lambda: print("calls", calls[0], "dropped", handler.writer.dropped, flush=True))
from instrumentation import get_dispatcher
from instrumentation.storage import flush_on_sigterm, record_to
{own}
d = get_dispatcher("sigterm.app")
handler = record_to({str(db)!r}, max_queue=50, block_timeout=0.01, debounce=0.05)
flush_on_sigterm()
@d.span
def work(i):
    calls[0] += 1
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
deadline = time.monotonic() + 20
while not stop and time.monotonic() < deadline:
    work(0)
print("kept running", flush=True)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], timeout=120, capture_output=True, text=True
    )
    if previous == "own handler":
        assert done.returncode == 0, done.stderr
        assert "own handler" in done.stdout and "kept running" in done.stdout
    else:
        assert done.returncode == 143, done.stderr
        assert "kept running" not in done.stdout
    words = done.stdout.split()
    calls, dropped = int(words[words.index("calls") + 1]), int(words[words.index("dropped") + 1])
    assert dropped > 0  # the queue was full when SIGTERM came
    # Every span accepted is stored. The call SIGTERM interrupts is one either way:
    # interrupted before it counted itself, its span may be stored (+1), or refused
    # with its SpanDropEvent, two entries that `dropped` counts (+2); interrupted
    # between the handler taking its span and queuing it, it is lost (-1). (While it
    # waits for room in the queue, where SIGTERM mostly lands, it is kept: see
    # test_an_entry_interrupted_while_it_waits_for_room_is_kept.)
    assert -1 <= count(SQLiteStore(db), "spans") - (calls - dropped) <= 2


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
def test_an_entry_interrupted_while_it_waits_for_room_is_kept(
    tmp_path: Path, make_handler: Any
) -> None:
    """Ctrl-C (or SIGTERM's SystemExit) while the application waits for room in a full
    queue: the entry it was queuing was neither queued nor counted as dropped. It is
    queued now, and written."""
    store = ControlledSQLiteStore(tmp_path / "t.db")
    store.gate.clear()  # the writer holds its first batch: the queue fills
    handler = make_handler(store, max_queue=5, block_timeout=60, debounce=0.01)
    handler.handle(NoteEvent(text="first"))
    deadline = time.monotonic() + 10
    while store.attempts == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in range(5):
        handler.handle(NoteEvent(text=f"queued {i}"))
    timer = threading.Timer(0.3, signal.pthread_kill, (threading.get_ident(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            handler.handle(NoteEvent(text="interrupted"))
    finally:
        timer.cancel()
    store.gate.set()
    assert handler.flush(10)
    assert handler.writer.dropped == 0
    texts = sorted(e.payload["text"] for e in store.events())
    assert texts == sorted(["first", "interrupted", *(f"queued {i}" for i in range(5))])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_flush_on_sigterm_leaves_children_and_the_exit_flush_alone(tmp_path: Path) -> None:
    """A child forked after flush_on_sigterm() (a Pool worker being terminated) dies of
    SIGTERM at once, as before; a SIGTERM while the exit flush waits for a locked
    database is ignored, and the flush finishes (it was cut short, and lost the rows)."""
    db = tmp_path / "t.db"
    SQLiteStore(db).close()
    script = f"""
import os, signal, sqlite3, sys, threading, time
from instrumentation import get_dispatcher
from instrumentation.storage import flush_on_sigterm, record_to
record_to({str(db)!r}, debounce=60)
flush_on_sigterm()
for own in (False, True):  # a child that calls flush_on_sigterm() itself, or not
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        if own:
            flush_on_sigterm()
        os.write(ready_w, b"x")  # signals caught before the fork is done are dropped
        try:
            time.sleep(30)
        finally:
            os._exit(143 if own else 0)
    os.read(ready_r, 1)
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    print("child", own, os.waitstatus_to_exitcode(status), flush=True)
with get_dispatcher("sigterm.app").span("kept"):
    pass
locker = sqlite3.connect({str(db)!r}, isolation_level=None, check_same_thread=False)
locker.execute("BEGIN EXCLUSIVE")
for delay, call, args in ((0.5, os.kill, (os.getpid(), signal.SIGTERM)),
                          (1.5, locker.execute, ("ROLLBACK",))):
    timer = threading.Timer(delay, call, args)
    timer.daemon = True
    timer.start()
"""
    done = subprocess.run(
        [sys.executable, "-c", script], timeout=60, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "child False -15" in done.stdout  # killed by SIGTERM, as by default
    assert "child True 143" in done.stdout  # SystemExit, its own choice
    assert count(SQLiteStore(db), "spans") == 1


_CTRL_C_AT_EXIT = """
import os, signal, sqlite3, threading
from instrumentation import get_dispatcher
from instrumentation.storage import open_store, record_to
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
record_to(open_store({target!r}), retry_for=60, spool_dir={spool!r})
d = get_dispatcher("ctrl_c.app")
for i in range(50):
    with d.span("queued"):
        pass
{before_exit}
# Ctrl-C once the exit waits for the writer (8 s of its exit_timeout, then 2 s more).
timer = threading.Timer(0.8, os.kill, (os.getpid(), signal.SIGINT))
timer.daemon = True
timer.start()
"""


def _exit_with_ctrl_c(target: str, spool: Path, before_exit: str = "") -> str:
    """Run a script that records 50 spans to ``target`` and exits; Ctrl-C comes while
    the exit waits for the writer. Its stderr, once it is checked that the exit was
    quick (not the exit_timeout of 10 s) and printed no traceback."""
    script = _CTRL_C_AT_EXIT.format(target=target, spool=str(spool), before_exit=before_exit)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], timeout=60, capture_output=True, text=True
    )
    assert time.monotonic() - started < 7, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    return done.stderr


def _spooled_rows(spool: Path) -> int:
    return sum(len(path.read_text().splitlines()) for path in spool.glob("*.jsonl"))


def test_ctrl_c_while_the_exit_waits_for_the_database_spools_the_rest(tmp_path: Path) -> None:
    """Ctrl-C while the exit retries writes to a database that is down: the exit stops
    waiting, with the rows in the spool file. It printed atexit's "Exception ignored"
    and the KeyboardInterrupt's traceback, and the rows being retried were lost
    without a word (the writer thread died with the process)."""
    pytest.importorskip("psycopg")
    spool = tmp_path / "spool"
    with socket.socket() as probe:  # a port nothing listens on: refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _exit_with_ctrl_c(f"postgresql://postgres@127.0.0.1:{port}/traces", spool)
    assert _spooled_rows(spool) == 50


def test_ctrl_c_while_a_write_waits_for_the_database_says_what_is_lost(tmp_path: Path) -> None:
    """Ctrl-C while the exit waits for a write that waits on its own (for a lock held
    elsewhere, here; a connect timeout): the exit stops waiting, and says how many
    entries are neither stored nor spooled."""
    db = tmp_path / "t.db"
    SQLiteStore(db).close()
    locker = (
        f"locker = sqlite3.connect({str(db)!r}, isolation_level=None, check_same_thread=False)\n"
        'locker.execute("BEGIN EXCLUSIVE")'
    )
    stderr = _exit_with_ctrl_c(str(db), tmp_path / "spool", before_exit=locker)
    assert "did not stop before Ctrl-C cut the exit short" in stderr, stderr
    assert "0 queued entries and the 50 being written are not stored" in stderr, stderr
    assert count(SQLiteStore(db), "spans") == 0


def test_sigterm_without_flush_on_sigterm_loses_the_queue(tmp_path: Path) -> None:
    """What flush_on_sigterm() is for: Python's default SIGTERM kills the process with
    the queue unwritten."""
    db = tmp_path / "t.db"
    script = f"""
import os, signal, time
from instrumentation import get_dispatcher
from instrumentation.storage import record_to
d = get_dispatcher("sigterm.app")
record_to({str(db)!r}, batch_size=100000, debounce=60)
with d.span("queued"):
    pass
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)
"""
    done = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True)
    assert done.returncode == -15
    assert count(SQLiteStore(db), "spans") == 0


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    with pytest.raises(ValueError, match="on_full"):
        StorageHandler(store=store, on_full="ignore")
    with pytest.raises(ValueError, match="batch_size"):
        StorageHandler(store=store, batch_size=0)
    with pytest.raises(ValueError, match="unknown metadata"):
        StorageHandler(store=store, metadata={"colour": "red"})
    with pytest.raises(Exception, match="store"):
        StorageHandler(store="traces.db")


def test_one_object_is_both_event_and_span_handler(tmp_path: Path, make_handler: Any) -> None:
    """attach() adds the same object as event handler and span handler."""
    handler = make_handler(SQLiteStore(tmp_path / "t.db")).attach(d)
    assert handler in d.event_handlers and handler in d.span_handlers
    handler.detach()
    assert handler not in d.event_handlers and handler not in d.span_handlers


def test_an_entry_that_is_no_event_is_skipped_and_counted(
    tmp_path: Path, make_handler: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage handed to the writer is counted and logged once, not per entry; others are
    kept. The flush it was queued before says that something was lost."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store)
    with caplog.at_level(logging.ERROR, logger="instrumentation.storage"):
        for _ in range(50):
            handler.writer.put(object())
        handler.handle(NoteEvent(text="fine"))
        assert handler.flush(10) is False
        assert handler.writer.rows_lost == 50
    assert [e.payload["text"] for e in store.events()] == ["fine"]
    assert telemetry.counter("storage.unwritable_entries").value == 50
    assert len([r for r in caplog.records if "could not make a row" in r.getMessage()]) == 1


def test_rows_the_database_refuses_do_not_block_the_rest(any_store: Any, make_handler: Any) -> None:
    """NUL characters (refused by PostgreSQL) are replaced; one bad row never poisons a batch."""
    handler = make_handler(any_store, batch_size=100)
    handler.handle(NoteEvent(text="before"))
    handler.handle(NoteEvent(text="nul\x00inside", tags={"k": "v\x00"}))
    handler.handle(NoteEvent(text="after"))
    assert handler.flush(10)
    texts = sorted(e.payload["text"] for e in any_store.events())
    assert texts[0] == "after" and texts[1] == "before"
    assert texts[2].startswith("nul") and texts[2].endswith("inside")
    assert telemetry.counter("storage.rejected_rows").value == 0


@pytest.mark.parametrize("odd", ["nul\x00inside", "lone \ud800 surrogate"])
def test_text_a_database_refuses_keeps_its_batch_in_one_transaction(
    any_store: Any, make_handler: Any, odd: str
) -> None:
    """A NUL (PostgreSQL refuses it) or a lone surrogate (both refuse it) in one row:
    the batch is still written in one transaction, not one row at a time (a trace was
    listed in parts meanwhile). What is stored is what the row by row path stored:
    U+FFFD where the database refuses the character, the text as it was elsewhere."""
    handler = make_handler(any_store, batch_size=100, debounce=10)
    batches = telemetry.counter("storage.batches_written").value
    for i in range(20):
        handler.handle(NoteEvent(text=f"note {i}"))
    handler.handle(NoteEvent(text=odd))
    assert handler.flush(10)
    assert telemetry.counter("storage.batches_written").value == batches + 1
    texts = {e.payload["text"] for e in any_store.events()}
    kept = odd.replace("\ud800", "\ufffd")
    if type(any_store).__name__ == "PostgresStore":
        kept = kept.replace("\x00", "\ufffd")
    assert texts == {f"note {i}" for i in range(20)} | {kept}


def test_a_spooled_chunk_with_text_refused_is_replayed_in_one_transaction(
    tmp_path: Path, make_handler: Any
) -> None:
    """What was spooled while the database was away is replayed as a fresh batch is
    written: a lone surrogate in one row does not send the chunk row by row."""
    store = ControlledSQLiteStore(tmp_path / "t.db")
    store.fail = True
    handler = make_handler(store, batch_size=100, debounce=10, retry_for=0)
    for i in range(20):
        handler.handle(NoteEvent(text=f"note {i}"))
    handler.handle(NoteEvent(text="lone \ud800 surrogate"))
    assert handler.flush(10) is False  # spooled
    store.fail = False
    attempts = store.attempts
    assert handler.flush(10)
    # The chunk refused, then taken whole cleaned: two writes, not one per row.
    assert store.attempts - attempts == 2
    texts = {e.payload["text"] for e in store.events()}
    assert texts == {f"note {i}" for i in range(20)} | {"lone \ufffd surrogate"}


def test_a_nul_makes_psycopg_log_nothing(
    postgres_dsn: str, make_handler: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch PostgreSQL refused inside executemany's pipeline made psycopg log "error
    ignored terminating <psycopg.Pipeline ...>: pipeline aborted", most times: noise on
    the stderr of an application that configured no logging. A NUL is cleaned before
    the batch is sent, so it is not refused."""
    from instrumentation.storage.postgres import PostgresStore

    store = PostgresStore(postgres_dsn)
    try:
        handler = make_handler(store, batch_size=500, debounce=10)
        with caplog.at_level(logging.WARNING, logger="psycopg"):
            for _ in range(5):
                for i in range(400):
                    handler.handle(NoteEvent(text="nul\x00" if i == 37 else "plain"))
                assert handler.flush(10)
        assert len(store.events(limit=None)) == 2000
    finally:
        store.close()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("psycopg")] == []


def test_the_text_backslash_u0000_beside_a_nul_is_kept(
    postgres_dsn: str, make_handler: Any
) -> None:
    """The six characters \\u0000 are text, not the escape of a NUL: cleaning a row
    for PostgreSQL changed them to \\ufffd when the same string also held a NUL."""
    from instrumentation.storage.postgres import PostgresStore

    store = PostgresStore(postgres_dsn)
    try:
        handler = make_handler(store)
        both = "NUL\x00 then the six characters \\u0000"
        handler.handle(NoteEvent(text=both, tags={"k": "\\u0000\x00"}))
        handler.handle(NoteEvent(text="alone \\u0000"))
        assert handler.flush(10)
        stored = {e.payload["text"]: e.payload["tags"] for e in store.events()}
    finally:
        store.close()
    assert stored == {
        both.replace("\x00", "\ufffd"): {"k": "\\u0000\ufffd"},
        "alone \\u0000": {},
    }


def test_every_documented_counter_is_there_from_import(tmp_path: Path) -> None:
    """docs/storage.md lists the storage counters of telemetry.snapshot(); a healthy
    process that never spooled has them all (at 0), not a KeyError."""
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "storage.md").read_text("utf-8")
    paragraph = doc[doc.index("Counters (`instrumentation.telemetry.snapshot()`") :]
    paragraph = paragraph[: paragraph.index("\n\n")]
    documented = set(re.findall(r"`(storage\.[a-z_]+)`", paragraph))
    assert {"storage.spooled_rows", "storage.rows_written", "storage.dropped"} <= documented
    script = (
        "import json, instrumentation.storage\n"
        "from instrumentation import telemetry\n"
        "print(json.dumps(telemetry.snapshot()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    snapshot = json.loads(done.stdout)
    assert {name: snapshot.get(name) for name in documented} == dict.fromkeys(documented, 0)
    registered = {name for name in snapshot if name.startswith("storage.")}
    assert registered == documented  # and none undocumented


def test_rows_the_driver_cannot_bind_are_rejected_not_spooled_forever(
    any_store: Any, spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A row of the wrong length or with a nested value (from a ``rows_of`` of one's
    own) makes sqlite3 and psycopg raise ProgrammingError before the database sees
    it: the row is rejected and counted, the others of its batch are written."""
    from instrumentation.storage.serialise import RowMaker

    maker = RowMaker({}, {}, 10_000)
    good = [maker.event_row(NoteEvent(text=str(i)), None) for i in range(3)]
    writer = BatchWriter(
        any_store,
        lambda entries: ([], list(entries)),
        debounce=0.01,
        retry_for=0,
        replay_interval=3600,
        spool_dir=spool_dir,
    )
    try:
        for row in (good[0], good[1][:5], good[1], (*good[2][:-1], {"nested": 1}), good[2]):
            writer.put(row)
        assert writer.flush(10) is False  # two rows waiting for it were rejected
        assert sorted(e.payload["text"] for e in any_store.events()) == ["0", "1", "2"]
        assert writer.rows_lost == 2 and not writer.spool.pending
        assert telemetry.counter("storage.rejected_rows").value == 2
        assert "ProgrammingError" in caplog.text
    finally:
        writer.shutdown(5)


def test_a_missing_table_keeps_the_rows_spooled_for_later(
    any_store: Any, make_handler: Any
) -> None:
    """An error about the database rather than the rows (no such table: SQLite's
    OperationalError, PostgreSQL's UndefinedTable, a ProgrammingError too) rejects
    nothing: the rows wait in the spool until the table is back."""
    from instrumentation.storage.postgres import PostgresStore

    def rename(old: str, new: str) -> None:
        if isinstance(any_store, PostgresStore):
            import psycopg

            with psycopg.connect(any_store.dsn, autocommit=True) as conn:
                conn.execute(f"ALTER TABLE {old} RENAME TO {new}")
        else:
            with any_store._lock:
                any_store._connection().execute(f"ALTER TABLE {old} RENAME TO {new}")

    handler = make_handler(any_store, retry_for=0, replay_interval=0.05)
    rename("events", "events_away")
    for i in range(5):
        handler.handle(NoteEvent(text=str(i)))
    assert handler.flush(3) is False
    assert handler.writer.spool.rows_pending == 5
    assert handler.writer.rows_lost == 0
    assert telemetry.counter("storage.rejected_rows").value == 0
    rename("events_away", "events")
    assert wait_until(lambda: handler.flush(1), 15)
    assert sorted(e.payload["text"] for e in any_store.events()) == ["0", "1", "2", "3", "4"]


def test_a_generator_its_caller_stopped_reading_is_stored_ok_without_a_drop_event(
    tmp_path: Path, make_handler: Any
) -> None:
    """The span was stored as ok, and a SpanDropEvent (err_str '') under it said
    otherwise; a real failure keeps its drop event, which names the error's class."""
    from instrumentation import SpanDropEvent

    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store).attach(d)
    words, broken = stop_one_and_fail_one(d, message="")
    assert handler.flush(10)
    spans = {s.name: s for t in store.traces() for s in store.trace(t.trace_id)}
    assert spans[words].status == "ok"
    assert spans[broken].status == "error"
    drops = [e for e in store.events() if e.type == SpanDropEvent.class_name()]
    assert [(e.span_id, e.payload.get("err_type")) for e in drops] == [
        (spans[broken].id_, "ValueError")
    ]


def test_a_span_whose_start_readings_were_split_by_another_thread_stays_in_its_parent() -> None:
    """A span's start is read twice (wall clock, then perf_counter, which times it):
    another thread's turn between the two made its stored times early by the pause, and
    a child then ended after its parent (13 in 625,483 spans in an 8-minute soak)."""
    from instrumentation.storage.serialise import RowMaker

    offset = 1_700_000_000.0  # wall clock less perf_counter, read without a pause

    def entry(span_id: str, parent: str | None, wall: float, perf: float, end: float) -> Any:
        info = (wall, perf, parent, parent is None, span_id, "t" * 32, "app", None, None, None)
        return (info, span_id, end, None)

    # The parent's perf_counter reading came 5 ms after its wall clock reading.
    parent = entry("parent", None, offset + 10.000, 10.005, 10.010)
    child = entry("child", "parent", offset + 10.006, 10.006, 10.009)
    # A clock step (or the machine asleep) moves the difference by more: kept as read.
    stepped = entry("stepped", None, offset + 9.0, 10.020, 10.021)
    rows, _ = RowMaker({}, {}, 1_000_000).rows([parent, child, stepped])
    by_id = {row[0]: row for row in rows}
    start, end = by_id["parent"][6], by_id["parent"][7]
    assert start <= by_id["child"][6] <= by_id["child"][7] <= end
    assert start == pytest.approx(offset + 10.005, abs=1e-6)
    assert end - start == pytest.approx(0.005, abs=1e-6)
    assert by_id["stepped"][6] == offset + 9.0
    # The clocks drift apart (20 parts per million): a span ten minutes long is not
    # dated by the difference read by one that started as it ended (12 ms on).
    long = entry("long", None, offset + 20.0, 20.0, 620.0)
    fresh = entry("fresh", "long", offset + 0.012 + 619.9, 619.9, 619.95)
    rows, _ = RowMaker({}, {}, 1_000_000).rows([fresh, long])
    assert {row[0]: row[6] for row in rows}["long"] == offset + 20.0


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("retry_for", float("nan")),
        ("retry_for", float("inf")),
        ("debounce", float("nan")),
        ("debounce", float("inf")),
        ("debounce", 1e300),
        ("block_timeout", float("nan")),
        ("block_timeout", float("inf")),
        ("retry_backoff", float("nan")),
        ("replay_interval", float("nan")),
        ("replay_interval", 1e300),
        ("batch_size", 10**30),
        ("max_queue", 10**30),
        ("max_payload_chars", 10**30),
    ],
)
def test_a_number_out_of_range_is_refused_naming_the_option(
    tmp_path: Path, option: str, value: Any
) -> None:
    """retry_for=nan was taken, and every SQLite write then failed ("cannot convert float
    NaN to integer"), its rows spooled and the database blamed; block_timeout=inf made
    each put() that waited raise OverflowError into the application. Every number goes
    through one check: finite, and within what it can mean (a day of seconds, 10**9
    entries or characters)."""
    store = SQLiteStore(tmp_path / "t.db")
    with pytest.raises(ValueError, match=rf"{option} is (seconds|a whole number).*got"):
        StorageHandler(store=store, **{option: value})
    store.close()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("debounce", "1"),
        ("debounce", None),
        ("retry_for", True),
        ("replay_interval", [1]),
        ("batch_size", "5"),
        ("batch_size", True),
        ("batch_size", 5.0),
        ("max_queue", "many"),
        ("max_payload_chars", None),
        ("close_store", "no"),
        ("close_store", 1),
    ],
)
def test_a_value_that_is_no_number_is_a_type_error_naming_the_option(
    tmp_path: Path, option: str, value: Any
) -> None:
    """The handler's options are pydantic fields, which took ``"1"`` for one second and
    ``True`` for a batch of one, and refused ``None`` with a ``ValidationError``; the
    docs (and the writer, and ``flush()``) say a value that is no number is a
    ``TypeError``."""
    store = SQLiteStore(tmp_path / "t.db")
    with pytest.raises(TypeError, match=rf"^{option} is (a number|a whole number|True or).*got"):
        StorageHandler(store=store, **{option: value})
    store.close()


def test_the_writer_checks_its_own_numbers_and_rows_of_the_same_way(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    for option, value in [("max_backoff", float("nan")), ("exit_timeout", float("inf"))]:
        with pytest.raises(ValueError, match=f"{option} is seconds, more than 0, at most 86400"):
            BatchWriter(store, lambda batch: ([], []), **{option: value})
    with pytest.raises(TypeError, match="close_store is True or False"):
        BatchWriter(store, lambda batch: ([], []), close_store="no")  # type: ignore[arg-type]
    # Not callable: the thread died on the first batch, and every entry after it was
    # kept in the queue, uncounted.
    with pytest.raises(TypeError, match="rows_of is a function"):
        BatchWriter(store, 5)  # type: ignore[arg-type]
    store.close()


class _WriterKilled(BaseException):
    """What no ``except Exception`` catches: it ends the writer thread."""


def test_a_writer_thread_that_dies_counts_and_logs_what_it_loses(
    tmp_path: Path, make_handler: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer thread ended by an error (a NUL in spool_dir did it, as did a rows_of
    that was not callable): what it held and what was queued behind it vanished,
    uncounted (dropped=0, rows_lost=0, queued stayed above 0), every later entry was
    queued for nobody, and flush() waited out its timeout. Now the entries it held or
    had queued are lost and counted, later ones dropped and counted, both logged, and
    flush() and shutdown() answer False at once."""
    store = ControlledSQLiteStore(tmp_path / "t.db")
    writing, die = threading.Event(), threading.Event()

    def fail_inside_the_write() -> None:
        writing.set()
        die.wait(10)
        raise _WriterKilled("the store raised what no except Exception catches")

    store.on_write = fail_inside_the_write
    handler = make_handler(store, batch_size=1)
    with caplog.at_level(logging.ERROR, logger="instrumentation.storage"):
        handler.handle(NoteEvent(text="held"))
        assert writing.wait(10)
        for i in range(4):
            handler.handle(NoteEvent(text=f"queued {i}"))
        die.set()
        thread = handler.writer._thread
        assert thread is not None
        thread.join(10)
        assert not thread.is_alive()
    assert "writer thread for" in caplog.text and "stopped by an error" in caplog.text
    assert "5 entries it was writing or had queued are lost" in caplog.text
    assert handler.writer.rows_lost == 5 and handler.writer.queued == 0
    assert telemetry.counter("storage.lost_rows").value == 5
    failure = handler.writer.failure
    assert failure == "_WriterKilled: the store raised what no except Exception catches"
    with caplog.at_level(logging.WARNING, logger="instrumentation.storage"):
        for _ in range(3):
            handler.handle(NoteEvent(text="after"))
    assert handler.dropped == 3 and telemetry.counter("storage.dropped").value == 3
    assert "because the writer thread stopped by an error (_WriterKilled" in caplog.text
    started = time.monotonic()
    assert handler.flush(10) is False
    assert handler.shutdown(10) is False
    assert time.monotonic() - started < 5
    assert handler.writer.queued == 0 and count(store, "events") == 0


def test_a_rows_of_that_raises_costs_its_batch_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rows_of given to BatchWriter that raises ended the thread; now its batch is
    lost, counted and logged, and the writer goes on with the next."""
    from instrumentation.storage.serialise import RowMaker

    store = SQLiteStore(tmp_path / "t.db")
    maker = RowMaker({}, {}, 10_000)

    def rows_of(entries: list[Any]) -> tuple[list[Any], list[Any]]:
        if any(e == "bad" for e in entries):
            raise RuntimeError("rows_of broke")
        return [], [maker.event_row(e, None) for e in entries]

    writer = BatchWriter(store, rows_of, batch_size=1, debounce=0.01)
    with caplog.at_level(logging.ERROR, logger="instrumentation.storage"):
        writer.put("bad")
        assert writer.flush(10) is False
    assert "rows_of failed for a batch of 1 entries" in caplog.text
    assert writer.rows_lost == 1
    assert telemetry.counter("storage.unwritable_entries").value == 1
    writer.put(NoteEvent(text="fine"))
    assert writer.flush(10) is True and writer.failure is None
    assert writer.shutdown(10) is True
    assert [e.payload["text"] for e in store.events()] == ["fine"]
    store.close()
