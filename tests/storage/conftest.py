"""Fixtures for the storage tests: SQLite files, and a real PostgreSQL server.

The server is started once per session from the installed binaries
(``/usr/lib/postgresql/*/bin``: ``initdb``, ``pg_ctl``) in a temporary directory, on
a free port of 127.0.0.1. PostgreSQL refuses to run as root, so as root the binaries
run as the ``postgres`` user through ``runuser``. Each test gets a database of its
own. The tests that need the server are skipped, saying why, only when no binaries
are installed.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from instrumentation.storage import SQLiteStore, Store


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if found:
        return Path(found[0]).parent
    which = shutil.which("pg_ctl")
    return Path(which).parent if which else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A throwaway PostgreSQL cluster that tests may stop and start again."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="instr-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        )

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed: {done.stdout}\n{done.stderr}\n{log}")

    def start(self) -> None:
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def destroy(self) -> None:
        try:
            self.stop()
        except Exception:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip(
            "no PostgreSQL server binaries (initdb, pg_ctl) installed; .ci/run installs them"
        )
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture(params=["sqlite", "postgres"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The same test against SQLite and against the real PostgreSQL server."""
    store: Store
    if request.param == "sqlite":
        store = SQLiteStore(tmp_path / "traces.db")
    else:
        from instrumentation.storage.postgres import PostgresStore

        store = PostgresStore(request.getfixturevalue("postgres_dsn"))
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def make_handler(spool_dir: Path) -> Iterator[Callable[..., Any]]:
    """Make StorageHandlers with quick test settings; every one is shut down afterwards."""
    from instrumentation.storage import StorageHandler

    made: list[StorageHandler] = []

    def make(store: Store, **options: Any) -> StorageHandler:
        options.setdefault("debounce", 0.02)
        options.setdefault("spool_dir", str(spool_dir))
        handler = StorageHandler(store=store, **options)
        made.append(handler)
        return handler

    yield make
    for handler in made:
        handler.detach()
        handler.shutdown(5)
        # The test's own store: the writer may have connected it again after the test
        # closed it (a shutdown's last write), and an open connection left to the
        # garbage collector is a ResourceWarning under -X dev.
        handler.store.close()
