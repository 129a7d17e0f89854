"""A real PostgreSQL server stopped and restarted under a running writer loses nothing."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from instrumentation import get_dispatcher, telemetry
from instrumentation.storage.postgres import PostgresStore

from .helpers import CountingTime, NoteEvent, count, wait_until

d = get_dispatcher("tests.storage.outage")


def test_every_entry_arrives_exactly_once_across_a_server_restart(
    postgres_server: Any, postgres_dsn: str, make_handler: Any, spool_dir: Path
) -> None:
    """Stop the server while events and spans stream in, start it again: all arrive, once."""
    store = PostgresStore(postgres_dsn, connect_timeout=1)
    handler = make_handler(
        store,
        batch_size=20,
        debounce=0.02,
        retry_for=0.3,
        retry_backoff=0.05,
        replay_interval=0.2,
    ).attach(d)
    produced = 0
    stop = threading.Event()
    spooled = telemetry.counter("storage.spooled_rows")

    def produce() -> None:
        nonlocal produced
        while not stop.is_set():
            for _ in range(10):
                with d.span("tick"):
                    d.event(NoteEvent(text=str(produced)))
                produced += 1
            # Paced by the writer, so the queue never fills: ten more once it has
            # taken these (written them, or spooled them while the server is down).
            wait_until(lambda: handler.writer.queued == 0 or stop.is_set(), 30)

    def handled(entries: int) -> bool:
        """Whether the rows of the first ``entries`` (a span and an event each) are
        written or spooled (the writer takes them in order)."""
        return bool(handler.writer.rows_written + spooled.value >= 2 * entries)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        assert wait_until(lambda: handler.writer.rows_written > 50, 20)
        postgres_server.stop()
        try:
            written_before, made_before = handler.writer.rows_written, produced
            # Entries keep coming while the database is down: a hundred more at
            # least, and all of them spooled.
            assert wait_until(lambda: produced >= made_before + 100, 20)
            made_while_down = produced
            assert wait_until(lambda: handled(made_while_down), 20)
            assert handler.writer.spool.pending and spooled.value > 0
        finally:
            postgres_server.start()
        # ...and after it is back, while the spool is replayed: until it is, and a
        # hundred more entries were made.
        made_before = produced
        assert wait_until(
            lambda: not handler.writer.spool.pending and produced >= made_before + 100, 30
        )
    finally:
        stop.set()
        producer.join()
    assert wait_until(lambda: handler.flush(2), 30)
    assert telemetry.counter("storage.write_errors").value > 0
    assert telemetry.counter("storage.replayed_rows").value > 0
    assert handler.dropped == 0
    reader = PostgresStore(postgres_dsn)
    assert count(reader, "events") == produced
    assert count(reader, "spans") == produced
    texts = reader._query("SELECT payload->>'text' FROM events", [])
    assert sorted(int(t[0]) for t in texts) == list(range(produced))
    assert handler.writer.rows_written > written_before
    assert not handler.writer.spool.path.exists()


def test_a_server_down_when_the_application_starts_does_not_stop_it(
    postgres_server: Any, postgres_dsn: str, make_handler: Any, spool_dir: Path
) -> None:
    """Making the store and recording work while the server is down; the rows arrive
    once it is up."""
    postgres_server.stop()
    try:
        store = PostgresStore(postgres_dsn, connect_timeout=1)
        assert telemetry.counter("storage.connect_errors").value == 1
        handler = make_handler(
            store, retry_for=0.2, retry_backoff=0.05, replay_interval=0.2
        ).attach(d)
        for i in range(10):
            d.event(NoteEvent(text=f"early-{i}"))
        assert wait_until(lambda: handler.writer.spool.pending, 10)
    finally:
        postgres_server.start()
    assert wait_until(lambda: handler.flush(2), 30)
    reader = PostgresStore(postgres_dsn)
    texts = reader._query("SELECT payload->>'text' FROM events", [])
    early = sorted(t[0] for t in texts if t[0] and t[0].startswith("early-"))
    assert early == sorted(f"early-{i}" for i in range(10))


@pytest.mark.parametrize("wrong", ["database", "role"])
def test_a_misconfigured_server_address_is_still_an_error_at_once(
    postgres_server: Any, wrong: str
) -> None:
    """A server that answers 'no such database' or 'no such role' is not 'down'."""
    port = postgres_server.port
    dsn = (
        postgres_server.dsn("no_such_database")
        if wrong == "database"
        else f"postgresql://no_such_role@127.0.0.1:{port}/postgres"
    )
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        PostgresStore(dsn, connect_timeout=2)
    assert telemetry.counter("storage.connect_errors").value == 0


@pytest.mark.parametrize(
    ("message", "down"),
    [
        ('connection to server at "h" failed: Connection refused', True),
        ("FATAL:  sorry, too many clients already", True),
        ('FATAL:  too many connections for role "app"', True),
        ("FATAL:  terminating connection due to administrator command", True),
        ("FATAL:  the database system is starting up", True),
        ("FATAL:  das Datenbanksystem fährt herunter", True),
        ('FATAL:  database "traces" does not exist', False),
        ('FATAL:  role "app" does not exist', False),
        ('FATAL:  password authentication failed for user "app"', False),
        ('FATAL:  no pg_hba.conf entry for host "10.0.0.1"', False),
    ],
)
def test_which_connection_errors_count_as_down(message: str, down: bool) -> None:
    """Down (deferred, counted) unless the server plainly says the address is wrong."""
    store = PostgresStore.__new__(PostgresStore)
    store._psycopg = psycopg
    assert store._unreachable(psycopg.OperationalError(message)) is down
    assert store._unreachable(ValueError(message)) is False


def test_tail_keeps_following_across_a_server_restart(
    postgres_server: Any,
    postgres_dsn: str,
    make_handler: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tail used to exit (status 2) when the server restarted; it says so and goes on."""
    import io

    from instrumentation.storage import cli

    counting = CountingTime()
    monkeypatch.setattr(cli, "time", counting)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    handler = make_handler(PostgresStore(postgres_dsn, connect_timeout=1)).attach(d)
    out = io.StringIO()
    result: list[int] = []
    args = ["--db", postgres_dsn, "tail", "--interval", "0.1", "--count", "1"]
    follower = threading.Thread(
        target=lambda: result.append(cli.main([*args, "--max-seconds", "30"], out=out))
    )
    follower.start()
    try:
        assert wait_until(lambda: counting.pauses >= 1, 20)  # it has read the database
        assert "cannot read" not in err.getvalue()
        postgres_server.stop()
        assert wait_until(lambda: "retrying" in err.getvalue(), 20)  # it has seen it go
        assert follower.is_alive()
    finally:
        postgres_server.start()
    with d.span("after the restart"):
        pass
    assert wait_until(lambda: handler.flush(2), 30)
    follower.join(40)
    assert result == [0]
    assert "after the restart" in out.getvalue()
    assert "again after" in err.getvalue()
