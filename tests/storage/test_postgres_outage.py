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

from .helpers import CountingTime, NoteEvent, app_role_dsn, count, wait_until

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
    with PostgresStore(postgres_dsn) as reader:
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
    with PostgresStore(postgres_dsn) as reader:
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
        # libpq's own: no password to send, a connection string it cannot use.
        ('connection to server at "h" failed: fe_sendauth: no password supplied', False),
        ('invalid integer value "54x2" for connection option "port"', False),
        ('connection is bad: invalid port number: "-5"', False),
        ('invalid connection option "colour"', False),
    ],
)
def test_which_connection_errors_count_as_down(message: str, down: bool) -> None:
    """Down (deferred, counted) unless the server plainly says the address is wrong."""
    store = PostgresStore.__new__(PostgresStore)
    store._psycopg = psycopg
    assert store._unreachable(psycopg.OperationalError(message)) is down
    assert store._unreachable(ValueError(message)) is False


@pytest.mark.parametrize(
    "dsn",
    [
        "host=127.0.0.1 port=-5 dbname=traces",
        "postgresql://postgres@127.0.0.1:0/traces",
        "host=127.0.0.1 port=99999 dbname=traces",
    ],
)
def test_a_port_out_of_range_is_an_error_at_once(dsn: str) -> None:
    """libpq's "invalid port number" was taken for a server that cannot be reached yet:
    the store was made, and its rows retried and spooled for ever. It is a mistake in
    the address, raised when the store is made, as a missing database is."""
    with pytest.raises(ValueError, match=r"invalid port number .* a port is 1 to 65535"):
        PostgresStore(dsn, connect_timeout=1)
    assert telemetry.counter("storage.connect_errors").value == 0


def test_a_port_out_of_range_in_pgport_is_an_error_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGPORT", "70000")
    with pytest.raises(ValueError, match=r"invalid port number '70000' in \$PGPORT"):
        PostgresStore("host=127.0.0.1 dbname=traces", connect_timeout=1)


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


def test_a_timeout_in_the_dsn_is_used_and_a_reader_waits_once(tmp_path: Path) -> None:
    """connect_timeout=5 was always passed, over the DSN's own: a server that takes the
    connection and never answers held the application 5 s at start whatever the DSN
    said, and the command line 10 s (it connected twice: to open, then to read)."""
    import socket
    import time

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections complete, and no one ever answers them
    try:
        port = silent.getsockname()[1]
        dsn = f"postgresql://app@127.0.0.1:{port}/traces?connect_timeout=2"
        started = time.monotonic()
        reader = PostgresStore(dsn, read_only=True)
        with pytest.raises(psycopg.OperationalError):
            reader.traces()
        took = time.monotonic() - started
        assert 1.5 < took < 4.5, took  # one wait of 2 s, not 5, nor two
    finally:
        silent.close()
    assert PostgresStore._timeout_option(_bare(dsn)) == {}
    assert PostgresStore._timeout_option(_bare(dsn, connect_timeout=3)) == {"connect_timeout": 3}
    no_timeout = dsn.replace("?connect_timeout=2", "")
    assert PostgresStore._timeout_option(_bare(no_timeout)) == {"connect_timeout": 5}
    with pytest.raises(ValueError, match="connect_timeout is seconds, more than 0"):
        PostgresStore(no_timeout, connect_timeout=0)


def _bare(dsn: str, connect_timeout: float | None = None) -> PostgresStore:
    store = PostgresStore.__new__(PostgresStore)
    store._psycopg = psycopg
    store.dsn = dsn
    store.connect_timeout = connect_timeout
    return store


def test_processes_writing_one_database_share_a_spool_key() -> None:
    """The key held every parameter but the password: a writer that crashed with
    application_name=worker-a left a spool file that worker-b never replayed."""
    base = "postgresql://app:secret@db.example:5433/traces"
    keys = {
        _bare(dsn).spool_key
        for dsn in (
            base,
            base + "?application_name=worker-a",
            base + "?application_name=worker-b&sslmode=prefer&connect_timeout=3",
            "host=db.example port=5433 dbname=traces user=app password=other",
        )
    }
    # Sorted, as older releases spelled it: their spool files are still adopted.
    assert keys == {"postgres:dbname=traces host=db.example port=5433 user=app"}
    assert _bare(base.replace("/traces", "/other")).spool_key not in keys
    # What names another database, or another schema in it, stays in the key.
    assert _bare("service=prod").spool_key != _bare("service=staging").spool_key
    tenant = base + "?options=-csearch_path%3D"
    assert _bare(tenant + "a").spool_key != _bare(tenant + "b").spool_key


def test_a_role_that_may_only_read_and_insert_can_record(
    postgres_server: Any, postgres_dsn: str
) -> None:
    """Every connection ran the migration's DDL (CREATE TABLE IF NOT EXISTS): a role
    without CREATE on the schema could not record, and a writer lost its way after the
    next reconnect. Tables at this release's version are used as they are."""
    PostgresStore(postgres_dsn).close()  # an administrator creates the tables
    dsn = app_role_dsn(postgres_dsn)
    from instrumentation.storage.serialise import RowMaker

    with PostgresStore(dsn) as store:
        store.write([], [RowMaker({}, {}, 100).event_row(NoteEvent(text="hi"), None)])
        assert [e.payload["text"] for e in store.events()] == ["hi"]


def test_a_session_the_server_closed_while_idle_is_made_again_quietly(postgres_dsn: str) -> None:
    """With idle_session_timeout (or after a restart, or a killed session) the next
    write failed once - a warning and a write error each time - and a reader's next
    query raised, though the server was there. Once more, on a new connection."""
    import time

    from instrumentation.storage.serialise import RowMaker

    maker = RowMaker({}, {}, 100)
    dsn = postgres_dsn + "?options=-c%20idle_session_timeout%3D300"
    with PostgresStore(dsn) as store:
        store.write([], [maker.event_row(NoteEvent(text="1"), None)])
        time.sleep(0.8)  # the server closes the idle session
        store.write([], [maker.event_row(NoteEvent(text="2"), None)])
        time.sleep(0.8)
        assert sorted(e.payload["text"] for e in store.events()) == ["1", "2"]


def _spool_full_logged(caplog: Any) -> int:
    """The rows the full spool refused, as the warnings tell them."""
    import re

    total = 0
    for record in caplog.records:
        message = record.getMessage()
        if "max_spool_bytes" in message:
            total += int(re.search(r"lost (\d+) (?:more )?rows", message).group(1))  # type: ignore[union-attr]
    return total


def test_rows_the_full_spool_refused_are_all_logged_once_the_server_is_back(
    postgres_server: Any, postgres_dsn: str, make_handler: Any, caplog: Any
) -> None:
    """The spool-full warning comes at most every 10 s: the rows refused after it were
    counted, but logged only if the outage went on 10 s more. A service that rode out
    the outage never logged them; they are once the database takes writes again."""
    caplog.set_level("WARNING", logger="instrumentation.storage")
    store = PostgresStore(postgres_dsn, connect_timeout=1)
    handler = make_handler(store, retry_for=0, replay_interval=0.05, max_spool_bytes=4096)
    postgres_server.stop()
    try:
        for batch in range(3):
            for i in range(20):
                handler.handle(NoteEvent(text=f"{batch} {i} " + "y" * 100))
            assert handler.flush(0.5) is False
        lost = telemetry.counter("storage.spool_full_rows").value
        assert lost > 20 and handler.writer.rows_lost == lost
        assert _spool_full_logged(caplog) < lost  # the first warning, at once; the rest held
    finally:
        postgres_server.start()
    handler.handle(NoteEvent(text="after"))
    assert wait_until(lambda: handler.flush(2), 30)
    # Read again: the writer may still have been refusing the last batch above (flush
    # gave up after 0.5 s), on a loaded machine.
    lost = telemetry.counter("storage.spool_full_rows").value
    assert _spool_full_logged(caplog) == lost == handler.writer.rows_lost
    assert count(store, "events") == 61 - lost


def test_rows_the_full_spool_refused_are_all_logged_at_shutdown(
    postgres_server: Any, postgres_dsn: str, make_handler: Any, caplog: Any
) -> None:
    """A process that exits during the outage logs the rows refused since the last
    spool-full warning, as it does entries dropped from a full queue."""
    caplog.set_level("WARNING", logger="instrumentation.storage")
    store = PostgresStore(postgres_dsn, connect_timeout=1)
    handler = make_handler(store, retry_for=0, replay_interval=3600, max_spool_bytes=4096)
    postgres_server.stop()
    try:
        for batch in range(3):
            for i in range(20):
                handler.handle(NoteEvent(text=f"{batch} {i} " + "y" * 100))
            handler.flush(0.5)
        assert handler.shutdown(5) is False
    finally:
        postgres_server.start()
    lost = telemetry.counter("storage.spool_full_rows").value
    assert lost > 20 and handler.writer.rows_lost == lost
    assert _spool_full_logged(caplog) == lost
