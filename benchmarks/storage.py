"""Storage benchmarks: the application's cost per entry, and sustained rows per second.

    python benchmarks/storage.py [--quick] [--pg-dsn DSN]

1. Application-thread cost per event handed to ``StorageHandler.handle`` (target:
   under 2 us), measured with the writer idle and with the writer busy (thread CPU
   time of the application thread, so the writer's own work is not counted).
2. Sustained rows/s through the handler (serialisation and batching on the writer
   thread included) into SQLite and PostgreSQL, beside the ceiling of plain
   ``executemany`` batches of the same rows into the same kind of database in the
   same run (target: at least half of it). PostgreSQL is started from the installed
   binaries in a temporary directory unless ``--pg-dsn`` is given; skipped if there
   are none.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from instrumentation import BaseEvent
from instrumentation.storage import SQLiteStore, StorageHandler, Store
from instrumentation.storage.serialise import RowMaker

try:
    from instrumentation.events.llm import LLMChatEndEvent, TokenUsage

    def make_event(i: int) -> BaseEvent:
        return LLMChatEndEvent(
            messages=[],
            response=None,
            model="bench-model",
            provider="offline",
            usage=TokenUsage(
                prompt_tokens=100 + i % 7, completion_tokens=20, total_tokens=120 + i % 7
            ),
            latency_ms=12.5,
            cost_usd=0.0001,
            tags={"request": i % 10},
        )
except ImportError:  # before instrumentation.events.llm exists

    class _Ev(BaseEvent):
        text: str = ""

    def make_event(i: int) -> BaseEvent:
        return _Ev(text=f"event {i}", tags={"request": i % 10})


BATCH = 500


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def enqueue_cost(tmp: Path, n: int, repeats: int) -> None:
    events = [make_event(i) for i in range(1000)]
    idle: list[float] = []
    busy: list[float] = []
    spans: list[float] = []
    for r in range(repeats):
        handler = StorageHandler(
            store=SQLiteStore(tmp / f"enqueue-{r}.db"),
            batch_size=10**7,
            debounce=3600,
            max_queue=10**7,
        )
        handle = handler.handle
        start = time.perf_counter()
        for i in range(n):
            handle(events[i % 1000])
        idle.append((time.perf_counter() - start) / n)
        enter, leave = handler.span_enter, handler.span_exit
        start = time.perf_counter()
        for i in range(n // 2):
            enter(
                id_=f"s-{i:016x}",
                bound_args=None,
                parent_id=None,
                tags={},
                name="s",  # type: ignore[arg-type]
                trace_id="0" * 32,
                dispatcher="bench",
                attributes=None,
            )
            leave(id_=f"s-{i:016x}", bound_args=None)  # type: ignore[arg-type]
        spans.append((time.perf_counter() - start) / (n // 2))
        handler.shutdown(120)
        handler = StorageHandler(store=SQLiteStore(tmp / f"busy-{r}.db"), max_queue=10**7)
        handle = handler.handle
        cpu = time.thread_time()
        for i in range(n):
            handle(events[i % 1000])
        busy.append((time.thread_time() - cpu) / n)
        handler.shutdown(300)
    print(f"application-thread cost (median of {repeats} runs of {n})")
    print(f"  handle(event), writer idle        {_median_us(idle):7.2f} us   (target < 2 us)")
    print(f"  handle(event), writer busy (CPU)  {_median_us(busy):7.2f} us")
    print(f"  span_enter + span_exit            {_median_us(spans):7.2f} us")


def sustained(label: str, make_store: Any, ceiling: Any, n: int, repeats: int) -> None:
    """Rows/s through the handler vs executemany of the same rows, fresh databases.

    The two alternate ``repeats`` times and the medians are compared, because the
    machine is shared and single runs vary.
    """
    events = [make_event(i) for i in range(n)]
    rows = RowMaker({}, {}, 65536).rows(events)[1]
    ours_runs: list[float] = []
    ceiling_runs: list[float] = []
    for _ in range(repeats):
        store: Store = make_store()
        handler = StorageHandler(store=store, batch_size=BATCH, max_queue=10**7, debounce=0.05)
        start = time.perf_counter()
        for ev in events:
            handler.handle(ev)
        assert handler.flush(600), "flush timed out"
        ours_runs.append(n / (time.perf_counter() - start))
        handler.shutdown(60)
        store.close()
        ceiling_runs.append(ceiling(rows))
    ours, best = statistics.median(ours_runs), statistics.median(ceiling_runs)
    print(
        f"{label:10s} handler {ours:9,.0f} rows/s   executemany ceiling {best:9,.0f} rows/s"
        f"   ratio {ours / best:5.2f}  (target >= 0.50; medians of {repeats})"
    )


def sqlite_ceiling(tmp: Path) -> Any:
    def run(rows: list[tuple[Any, ...]]) -> float:
        store = SQLiteStore(tmp / f"ceiling-{uuid.uuid4().hex}.db")  # same schema, pragmas
        conn = store._connection()
        sql = store._insert_events
        start = time.perf_counter()
        for i in range(0, len(rows), BATCH):
            conn.execute("BEGIN")
            conn.executemany(sql, rows[i : i + BATCH])
            conn.execute("COMMIT")
        rate = len(rows) / (time.perf_counter() - start)
        store.close()
        return rate

    return run


def pg_ceiling(new_dsn: Any) -> Any:
    def run(rows: list[tuple[Any, ...]]) -> float:
        from instrumentation.storage.postgres import PostgresStore

        store = PostgresStore(new_dsn())
        conn = store._connection()
        sql = store._insert_events
        start = time.perf_counter()
        for i in range(0, len(rows), BATCH):
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(sql, rows[i : i + BATCH])
        rate = len(rows) / (time.perf_counter() - start)
        store.close()
        return rate

    return run


class _Server:
    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
        if not found:
            raise RuntimeError("no PostgreSQL binaries")
        self.bindir = Path(found[0]).parent
        self.root = Path(tempfile.mkdtemp(prefix="bench-pg-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", f"{self.root}/data", "-A", "trust", "-U", "postgres", "--no-sync")
        self._run(
            "pg_ctl",
            "-D",
            f"{self.root}/data",
            "-l",
            f"{self.root}/log",
            "-w",
            "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1",
            "start",
        )

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def new_dsn(self) -> str:
        import psycopg

        name = f"b_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        try:
            self._run("pg_ctl", "-D", f"{self.root}/data", "-m", "fast", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--pg-dsn",
        help="use this PostgreSQL server (a database per run is not created: tables are shared)",
    )
    args = parser.parse_args()
    n_enqueue, repeats, n_rows = (50_000, 3, 10_000) if args.quick else (200_000, 5, 30_000)
    row_repeats = 2 if args.quick else 3
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        enqueue_cost(tmp, n_enqueue, repeats)
        print(f"sustained rows/s ({n_rows} events, batches of {BATCH})")
        counter = iter(range(10**6))
        sustained(
            "SQLite",
            lambda: SQLiteStore(tmp / f"ours-{next(counter)}.db"),
            sqlite_ceiling(tmp),
            n_rows,
            row_repeats,
        )
        server = None
        try:
            if args.pg_dsn:
                new_dsn = lambda: args.pg_dsn  # noqa: E731
            else:
                server = _Server()
                new_dsn = server.new_dsn
            from instrumentation.storage.postgres import PostgresStore

            sustained(
                "PostgreSQL",
                lambda: PostgresStore(new_dsn()),
                pg_ceiling(new_dsn),
                n_rows,
                row_repeats,
            )
        except (RuntimeError, ImportError, subprocess.CalledProcessError) as exc:
            print(f"PostgreSQL skipped: {exc}")
        finally:
            if server is not None:
                server.close()


if __name__ == "__main__":
    main()
